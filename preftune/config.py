"""Configuration: the packaged defaults, a user's YAML file and dotted ``key=value`` overrides."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from preftune import losses


class ConfigError(ValueError):
    """A config key or value the user must fix."""


def default_config() -> DictConfig:
    """Every key preftune reads, with its default (``preftune/configs/default.yaml``)."""
    text = resources.files("preftune").joinpath("configs/default.yaml").read_text()
    return OmegaConf.create(text)


def _leaf_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for key, value in cfg.items_ex(resolve=False):
        path = f"{prefix}{key}"
        keys.append(path)
        if isinstance(value, DictConfig):
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
    """Defaults, then the YAML file at ``path``, then ``key=value`` overrides (OmegaConf dotlist syntax)."""
    cfg = default_config()
    layers: list[tuple[str, DictConfig]] = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        loaded = OmegaConf.load(path)
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"{path}: the top level must be a mapping of keys")
        layers.append((str(path), loaded))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        layers.append((f"override '{item}'", OmegaConf.from_dotlist([item])))
    for source, layer in layers:
        _check_known(layer, cfg, source)
        cfg = OmegaConf.merge(cfg, layer)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"required config keys not set: {', '.join(missing)}")
    validate(cfg)
    return cfg


def validate(cfg: DictConfig) -> None:
    """Value checks that would otherwise fail deep inside training."""
    data, trainer = cfg.data, cfg.trainer
    if data.micro_batch_size < 1 or data.global_batch_size < 1:
        raise ConfigError("data.micro_batch_size and data.global_batch_size must be >= 1")
    if data.global_batch_size % data.micro_batch_size:
        raise ConfigError(
            f"data.global_batch_size ({data.global_batch_size}) must be a multiple of "
            f"data.micro_batch_size ({data.micro_batch_size}) x the number of ranks"
        )
    if data.max_seq_length < 2:
        raise ConfigError("data.max_seq_length must be >= 2 (one prompt token and one response token)")
    interval = trainer.val_check_interval
    if isinstance(interval, float) and not 0 < interval <= 1:
        raise ConfigError(f"trainer.val_check_interval={interval}: a float must be a fraction in (0, 1]")
    if isinstance(interval, int) and interval < 1:
        raise ConfigError(f"trainer.val_check_interval={interval}: an int must be >= 1 (steps)")
    if trainer.save_interval < 1:
        raise ConfigError("trainer.save_interval must be >= 1")
    if trainer.max_steps == -1 and (trainer.max_epochs is None or trainer.max_epochs < 1):
        raise ConfigError("set trainer.max_steps >= 1 or trainer.max_epochs >= 1")
    names = loss_names(cfg.dpo)
    unknown = [n for n in names if n not in losses.LOSS_NAMES]
    if unknown:
        nearest = difflib.get_close_matches(unknown[0], losses.LOSS_NAMES, n=1)
        hint = f" Did you mean '{nearest[0]}'?" if nearest else ""
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
    betas = cfg.optim.betas
    if not isinstance(betas, ListConfig) or len(betas) != 2:
        raise ConfigError("optim.betas must be a list of two floats")
    if cfg.model.dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"model.dtype={cfg.model.dtype}: use float32, bfloat16 or float16")
    if trainer.max_time is not None:
        parse_max_time(trainer.max_time)


def loss_names(dpo_cfg: DictConfig) -> list[str]:
    """``dpo.preference_loss`` as a list (a single name or a mixture)."""
    value = dpo_cfg.preference_loss
    return [str(v) for v in value] if isinstance(value, ListConfig) else [str(value)]


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
