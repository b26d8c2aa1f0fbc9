"""Configuration: the packaged defaults, a user's YAML file and dotted ``key=value`` overrides."""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf._yaml import get_yaml_loader

from preftune import losses


class ConfigError(ValueError):
    """A config key or value the user must fix."""


# Free-form values (a path, a mapping, a list of them): a later layer replaces them whole, never merges.
SOURCE_KEYS = ("data.train", "data.validation")


def default_config() -> DictConfig:
    """Every key preftune reads, with its default (``preftune/configs/default.yaml``)."""
    text = resources.files("preftune").joinpath("configs/default.yaml").read_text()
    return _parse_yaml(text, "preftune/configs/default.yaml")


def _yaml_loader() -> type:
    """OmegaConf's YAML loader without YAML 1.1's base-60 integers, so ``max_time: 1:00:00:00`` stays a
    string (YAML 1.1 would read it as 216000)."""
    int_tag = "tag:yaml.org,2002:int"

    class Loader(get_yaml_loader()):
        pass

    Loader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag != int_tag]
        for first, resolvers in Loader.yaml_implicit_resolvers.items()
    }
    decimal_or_based = re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0x[0-9a-fA-F_]+|[-+]?[0-9][0-9_]*)$")
    Loader.add_implicit_resolver(int_tag, decimal_or_based, list("-+0123456789"))
    return Loader


def _parse_yaml(text: str, source: str) -> DictConfig:
    try:
        loaded = yaml.load(text, Loader=_yaml_loader())
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: invalid YAML: {e}") from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys")
    return OmegaConf.create(loaded)


def _parse_override(item: str) -> DictConfig:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override '{item}' is not of the form key=value")
    layer = OmegaConf.create()
    OmegaConf.update(
        layer, key.strip(), yaml.load(value, Loader=_yaml_loader()) if value else None, merge=True
    )
    return layer


def _leaf_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for key, value in cfg.items_ex(resolve=False):
        path = f"{prefix}{key}"
        keys.append(path)
        if isinstance(value, DictConfig) and path not in SOURCE_KEYS:
            keys.extend(_leaf_keys(value, path + "."))
    return keys


def _check_known(user: DictConfig, defaults: DictConfig, source: str) -> None:
    known = set(_leaf_keys(defaults))
    for key in _leaf_keys(user):
        if key not in known:
            nearest = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.5)
            hint = f" Did you mean '{nearest[0]}'?" if nearest else ""
            raise ConfigError(f"{source}: unknown config key '{key}'.{hint}")


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Defaults, then the YAML file at ``path`` (or ``preset:NAME``, a packaged preset), then ``key=value``
    overrides (OmegaConf dotlist syntax)."""
    from preftune.config_checks import check_types

    defaults = cfg = default_config()
    layers: list[tuple[str, DictConfig]] = []
    if path is not None and str(path).startswith("preset:"):  # a packaged config: preftune presets
        from preftune.tools.presets import preset_text

        layers.append((str(path), _parse_yaml(preset_text(str(path).removeprefix("preset:")), str(path))))
    elif path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        layers.append((str(path), _parse_yaml(path.read_text(), str(path))))
    for item in overrides:
        layers.append((f"override '{item}'", _parse_override(item)))
    for source, layer in layers:
        _check_known(layer, cfg, source)
        check_types(layer, defaults, source)
        for key in SOURCE_KEYS:  # a later value replaces the whole entry (a list never merges into a mapping)
            if OmegaConf.select(layer, key, default=None) is not None:
                OmegaConf.update(cfg, key, None, merge=False)
        cfg = OmegaConf.merge(cfg, layer)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"required config keys not set: {', '.join(missing)}")
    validate(cfg)
    return cfg


def validate(cfg: DictConfig) -> None:
    """Value checks that would otherwise fail deep inside training (and ``config_checks.check_settings``)."""
    from preftune.config_checks import check_settings

    data = cfg.data
    if data.micro_batch_size < 1 or data.global_batch_size < 1:
        raise ConfigError("data.micro_batch_size and data.global_batch_size must be >= 1")
    if data.max_seq_length < 2:
        raise ConfigError("data.max_seq_length must be >= 2 (one prompt token and one response token)")
    _check_trainer(cfg.trainer)
    _check_losses(cfg)
    betas = cfg.optim.betas
    if not isinstance(betas, ListConfig) or len(betas) != 2:
        raise ConfigError("optim.betas must be a list of two floats")
    if cfg.distributed.strategy not in ("ddp", "fsdp2"):
        raise ConfigError(f"distributed.strategy={cfg.distributed.strategy}: use ddp or fsdp2")
    if cfg.model.dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"model.dtype={cfg.model.dtype}: use float32, bfloat16 or float16")
    if cfg.model.autocast not in (None, "bfloat16", "float16"):
        raise ConfigError(f"model.autocast={cfg.model.autocast}: use null, bfloat16 or float16")
    check_settings(cfg)


def _check_trainer(trainer: DictConfig) -> None:
    """``trainer.*``: intervals, limits, checkpoint retention, the NaN/inf skip limit."""
    from preftune.training.retention import Retention

    interval = trainer.val_check_interval
    if isinstance(interval, float) and not 0 < interval <= 1:
        raise ConfigError(f"trainer.val_check_interval={interval}: a float must be a fraction in (0, 1]")
    if isinstance(interval, int) and interval < 1:
        raise ConfigError(f"trainer.val_check_interval={interval}: an int must be >= 1 (steps)")
    if trainer.save_interval < 1:
        raise ConfigError("trainer.save_interval must be >= 1")
    if trainer.max_time is not None:
        parse_max_time(trainer.max_time)
    Retention.from_config(trainer)  # trainer.keep_last, trainer.keep_best
    skips = trainer.max_skipped_steps
    if isinstance(skips, bool) or not isinstance(skips, int) or skips < 1:
        raise ConfigError(f"trainer.max_skipped_steps={skips}: use a number of steps >= 1")


def _check_losses(cfg: DictConfig) -> None:
    """``dpo.*`` and ``reference.*``: known loss names, no mix of reference-free and other losses, one weight
    per loss, beta > 0, and a reference only for losses that use one."""
    names = losses.loss_names(cfg.dpo.preference_loss)
    unknown = [n for n in names if n not in losses.LOSS_NAMES]
    if unknown:
        nearest = difflib.get_close_matches(unknown[0], losses.LOSS_NAMES, n=1)
        hint = f" Did you mean '{nearest[0]}'?" if nearest else ""
        if unknown[0] == "sft":
            hint = " The SFT term is not a preference loss: set dpo.sft_loss_weight (e.g. 1.0) instead."
        raise ConfigError(
            f"dpo.preference_loss: unknown loss '{unknown[0]}'.{hint} Valid: {', '.join(losses.LOSS_NAMES)}"
        )
    free = {n in losses.REFERENCE_FREE_LOSSES for n in names}
    if len(free) > 1:
        raise ConfigError(
            "dpo.preference_loss: reference-free losses (simpo, orpo) cannot be mixed with others"
        )
    weights = cfg.dpo.preference_loss_weights
    if weights is not None and len(weights) != len(names):
        raise ConfigError(
            f"dpo.preference_loss_weights has {len(weights)} weights for {len(names)} losses ({', '.join(names)})"
        )
    if cfg.dpo.ref_policy_kl_penalty <= 0:
        raise ConfigError("dpo.ref_policy_kl_penalty (beta) must be > 0")
    if "robust" in names and not 0 <= cfg.dpo.label_smoothing < 0.5:
        raise ConfigError(
            f"dpo.label_smoothing={cfg.dpo.label_smoothing}: the robust loss needs 0 <= label_smoothing < 0.5"
        )
    if cfg.reference.mode not in ("online", "precompute"):
        raise ConfigError(f"reference.mode={cfg.reference.mode}: use online or precompute")
    if cfg.reference.path is not None and free == {True}:
        raise ConfigError(
            f"reference.path is set but dpo.preference_loss ({', '.join(names)}) uses no reference: "
            "remove reference.path"
        )


def parse_max_time(value: str) -> float:
    """``DD:HH:MM:SS`` (leading fields optional) to seconds."""
    parts = str(value).split(":")
    try:
        numbers = [float(p) for p in parts]
    except ValueError:
        numbers = []
    if not 1 <= len(numbers) <= 4 or any(n < 0 for n in numbers):
        raise ConfigError(f"trainer.max_time='{value}': expected DD:HH:MM:SS")
    seconds = 0.0
    for n, unit in zip(reversed(numbers), (1, 60, 3600, 86400), strict=False):
        seconds += n * unit
    return seconds
