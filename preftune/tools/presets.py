"""``preftune presets``: the packaged configs (``preftune/configs/presets/NAME.yaml``, read by
``preftune.config``), used as ``preftune train --config preset:NAME model.path=... data.train=...``; each
file's comments cite its recipe."""

from __future__ import annotations

from preftune.config import PRESET, preset_names, preset_text


def describe_presets() -> str:
    """One line per preset: its name and the first line of its comments."""
    width = max(map(len, preset_names()))
    lines = []
    for name in preset_names():
        summary = preset_text(name).splitlines()[0].removeprefix("#").strip()
        lines.append(f"{PRESET}{name:<{width}}  {summary}")
    return "\n".join(lines)
