"""Packaged configs for the models users bring (``preftune/configs/presets/NAME.yaml``), used as
``preftune train --config preset:NAME model.path=... data.train=...``; each file's comments cite its recipe."""

from __future__ import annotations

import difflib
from importlib import resources
from importlib.abc import Traversable

from preftune.config import ConfigError

PREFIX = "preset:"


def _presets_dir() -> Traversable:
    return resources.files("preftune").joinpath("configs/presets")


def preset_names() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in _presets_dir().iterdir() if p.name.endswith(".yaml"))


def preset_text(name: str) -> str:
    """The YAML of preset ``name``; ``ConfigError`` naming the presets when there is none of that name."""
    if name not in preset_names():
        nearest = difflib.get_close_matches(name, preset_names(), n=1)
        hint = f" Did you mean '{PREFIX}{nearest[0]}'?" if nearest else ""
        raise ConfigError(f"unknown preset '{name}'.{hint} Presets: {', '.join(preset_names())}")
    return _presets_dir().joinpath(f"{name}.yaml").read_text()


def describe_presets() -> str:
    """One line per preset: its name and the first line of its comments."""
    width = max(map(len, preset_names()))
    lines = []
    for name in preset_names():
        summary = preset_text(name).splitlines()[0].removeprefix("#").strip()
        lines.append(f"{PREFIX}{name:<{width}}  {summary}")
    return "\n".join(lines)
