"""Checks of a run's settings that would otherwise fail deep inside training, each made once, at load.

``check_types`` and ``check_settings`` read the config alone (``preftune.config.load_config`` runs them);
``check_environment`` reads what the config points at (the output directory, the model's directory or Hub
id, the launcher's ranks) and runs before any model or data is loaded, in ``train`` and ``inspect`` alike.
Each raises ``ConfigError``: one line naming the key, what is wrong and what to set instead.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from preftune.config import ConfigError, _leaf_keys
from preftune.training.distributed import env_world_size

NUMBER = (int, float)
PATHS = (str, list)  # one path, or a list of them

# Keys whose type the default does not tell (it is null or missing, or more than one type is accepted):
# (accepted types, whether null is accepted). Every other key takes its default's type and no null.
TYPES: dict[str, tuple[tuple[type, ...], bool]] = {
    "output_dir": ((str,), False),
    "model.path": ((str,), False),
    "model.attn_implementation": ((str,), True),
    "model.logprob_chunk_size": ((int,), True),
    "model.autocast": ((str,), True),
    "model.lora.target_modules": ((list, str), True),
    "data.train": (PATHS, False),
    "data.validation": (PATHS, True),
    "data.validation_fraction": (NUMBER, True),
    "data.chat_template": ((str,), True),
    "data.pack_length": ((int,), True),
    "data.cache_dir": ((str,), True),
    "dpo.preference_loss": ((str, list), False),
    "dpo.preference_loss_weights": ((list,), True),
    "dpo.preference_average_log_probs": ((bool,), True),
    "optim.sched.max_steps": ((int,), True),
    "trainer.max_epochs": ((int,), True),
    "trainer.max_time": ((str, int, float), True),
    "trainer.val_check_interval": (NUMBER, False),
    "trainer.limit_val_batches": (NUMBER, False),
    "trainer.gradient_clip_val": (NUMBER, True),
    "judge.function": ((str, list), True),
    "judge.weights": ((list,), True),
    "judge.reward_model": ((str,), True),
    "judge.llm.path": ((str,), True),
    "judge.llm.template": ((str,), True),
}
TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list"}


def _expected(key: str, default: Any) -> tuple[tuple[type, ...], bool] | None:
    if key in TYPES:
        return TYPES[key]
    if default is None or default == "???":
        return None  # a key another module owns and types itself
    if isinstance(default, bool):
        return (bool,), False
    if isinstance(default, float):
        return NUMBER, False
    if isinstance(default, ListConfig):
        return (list,), False
    return (type(default),), False


def _matches(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool):  # YAML's true is an int to Python: only a bool key takes it
        return bool in types
    if isinstance(value, ListConfig):
        return list in types
    return isinstance(value, types)


def check_types(layer: DictConfig, defaults: DictConfig, source: str) -> None:
    """Every value ``layer`` sets has the type its key takes (``optim.lr=abc``, ``trainer.max_steps=two``,
    ``data.train=null`` and ``model=abc`` are refused)."""
    for key in _leaf_keys(layer):
        value = OmegaConf.select(layer, key, throw_on_missing=False)
        default = OmegaConf.select(defaults, key, default=None, throw_on_missing=False)
        if isinstance(default, DictConfig):
            if not isinstance(value, DictConfig):
                raise ConfigError(
                    f"{source}: {key}={value!r}: '{key}' is a section; set its keys ({key}.<name>=...)"
                )
            continue
        expected = _expected(key, default)
        if expected is None or isinstance(value, DictConfig):
            continue
        types, nullable = expected
        if value is None:
            if not nullable:
                raise ConfigError(f"{source}: {key} cannot be null: set it to {_describe(types)}")
        elif not _matches(value, types):
            raise ConfigError(f"{source}: {key}={value!r}: expected {_describe(types)}")


def _describe(types: tuple[type, ...]) -> str:
    if types == NUMBER:
        return "a number"
    if types == PATHS:
        return "a path or a list of paths"
    return " or ".join(TYPE_NAMES[t] for t in types)


def packed_attention(cfg: DictConfig) -> str | None:
    """The attention implementation the policy is loaded with (None: transformers' choice)."""
    from preftune.modeling.attention import VARLEN

    packed = cfg.data.packing or cfg.data.share_prompt
    return cfg.model.attn_implementation or (VARLEN if packed else None)


def check_settings(cfg: DictConfig) -> None:
    """Rules between keys that the modules reading them would otherwise break on mid-run."""
    from preftune.data.packing import ATTENTION_IMPLEMENTATIONS
    from preftune.modeling.attention import VARLEN
    from preftune.training.optim import OPTIMIZERS, SCHEDULES

    data, world = cfg.data, env_world_size()
    if isinstance(data.train, ListConfig) and not data.train:
        raise ConfigError("data.train is an empty list: set it to a data file, a directory or a list of them")
    # Each rank takes an equal share of the pairs; unpacked, in whole micro-batches (packing counts rows).
    unit, why = (
        (world, f"{world} ranks")
        if data.packing
        else (data.micro_batch_size * world, f"data.micro_batch_size {data.micro_batch_size} x {world} ranks")
    )
    if data.global_batch_size % unit:
        raise ConfigError(
            f"data.global_batch_size ({data.global_batch_size}) must be a multiple of {unit} ({why})"
        )
    if cfg.optim.name not in OPTIMIZERS:
        raise ConfigError(f"optim.name={cfg.optim.name!r}: use one of {', '.join(OPTIMIZERS)}")
    if cfg.optim.sched.name not in SCHEDULES:
        raise ConfigError(f"optim.sched.name={cfg.optim.sched.name!r}: use one of {', '.join(SCHEDULES)}")
    _check_judged_validation(cfg)
    attention = packed_attention(cfg)
    if cfg.model.compile and attention == VARLEN:
        raise ConfigError(
            f"model.compile does not support {VARLEN} attention (its per-sequence loop would recompile on "
            "every batch); set model.attn_implementation=sdpa or model.compile=false"
        )
    if data.packing or data.share_prompt:
        if attention not in ATTENTION_IMPLEMENTATIONS:
            raise ConfigError(
                f"model.attn_implementation={attention}: packing / shared prompt needs one of "
                f"{', '.join(ATTENTION_IMPLEMENTATIONS)} (or set data.packing=false and data.share_prompt=false)"
            )
        if data.pack_length is not None and data.pack_length < 2 * data.max_seq_length:
            raise ConfigError(
                f"data.pack_length={data.pack_length}: a pair can take 2 x data.max_seq_length = "
                f"{2 * data.max_seq_length} tokens; raise data.pack_length or lower data.max_seq_length"
            )


def _check_judged_validation(cfg: DictConfig) -> None:
    """``trainer.judge_prompts``: a count, and a judge to score them."""
    from preftune.modeling.judges import judge_is_set

    num = cfg.trainer.judge_prompts
    if num < 0:
        raise ConfigError(f"trainer.judge_prompts={num}: use a number of validation prompts >= 0 (0: off)")
    if num > 0 and not judge_is_set(cfg.judge):
        raise ConfigError(
            f"trainer.judge_prompts={num} needs a judge: set judge.function, judge.reward_model or "
            "judge.llm.path (or trainer.judge_prompts=0)"
        )


def check_environment(cfg: DictConfig, *, tokenizer_only: bool = False) -> None:
    """What the config points at exists and fits: a writable ``output_dir``, a model at ``model.path`` (a
    directory with ``config.json`` and weights, or a Hub id) of a family the chosen layout supports, the same
    for ``reference.path``, and a launcher with what ``torch.distributed`` needs. Runs before the model or
    data is loaded. ``tokenizer_only`` (``inspect``): a local ``model.path`` may hold just a tokenizer."""
    _check_output_dir(Path(cfg.output_dir))
    model_config = _model_config(cfg.model, "model.path", tokenizer_only)
    if model_config is not None and (cfg.data.packing or cfg.data.share_prompt):
        from preftune.modeling.compat import layer_windows

        layer_windows(model_config)  # a ConfigError for what packed rows cannot lay out
    if cfg.reference.path is not None and not tokenizer_only:
        _model_config({**cfg.model, "path": cfg.reference.path}, "reference.path", tokenizer_only=False)
    if not tokenizer_only:
        from preftune.modeling.judges import check_judge, judge_is_set

        if judge_is_set(cfg.judge):
            check_judge(cfg.judge)  # resolves the reward functions, reads the judge model's config
    if cfg.model.lora.r > 0 and importlib.util.find_spec("peft") is None:
        raise ConfigError("model.lora.r > 0 needs peft: pip install 'preftune[lora]'")
    if env_world_size() > 1:
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise ConfigError(
                    f"{name} is not set: launch with torchrun, or export it in the SLURM script"
                )
        if cfg.distributed.strategy == "fsdp2" and cfg.model.lora.r > 0:
            raise ConfigError(
                "model.lora.r > 0 with distributed.strategy=fsdp2 is not supported yet: use ddp"
            )


def _check_output_dir(output_dir: Path) -> None:
    """``output_dir`` can be created and written to (tried for real: permission bits do not bind root)."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"output_dir={output_dir} is a file: point output_dir at a directory")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as e:
        raise ConfigError(
            f"output_dir={output_dir} cannot be written ({e.strerror or e}): choose a writable directory"
        ) from None


def _model_config(model_cfg: Any, key: str, tokenizer_only: bool) -> Any:
    """The ``transformers`` config of the model at ``model_cfg["path"]`` (a local directory, else a Hub id)
    named by ``key``; None for a local directory without ``config.json`` when ``tokenizer_only``."""
    from transformers import AutoConfig

    from preftune.modeling.hub import check_model_source

    path = str(model_cfg["path"])
    check_model_source(path, key, tokenizer_only=tokenizer_only)
    local = Path(path).expanduser()
    if local.is_dir() and not (local / "config.json").is_file():
        return None  # a tokenizer alone (inspect): check_model_source refuses it otherwise
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=model_cfg["trust_remote_code"])
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}={path}: its config.json cannot be read: {_first_line(e)}") from None


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def absolute_paths(cfg: DictConfig) -> DictConfig:
    """``cfg`` with ``output_dir``, ``data.cache_dir`` and local model and data paths made absolute, so the saved
    ``config.yaml`` and a LoRA adapter's ``base_model_name_or_path`` work from any directory."""
    cfg = cfg.copy()
    cfg.output_dir = str(Path(cfg.output_dir).expanduser().resolve())
    if cfg.data.cache_dir:
        cfg.data.cache_dir = str(Path(cfg.data.cache_dir).expanduser().resolve())
    cfg.model.path = _absolute_if_local(cfg.model.path)
    if cfg.reference.path is not None:
        cfg.reference.path = _absolute_if_local(cfg.reference.path)
    _absolute_judge_paths(cfg.judge)
    for key in ("train", "validation"):
        sources = cfg.data[key]
        if isinstance(sources, ListConfig):
            for i, source in enumerate(sources):
                sources[i] = _absolute_source(source)
        elif sources is not None:
            cfg.data[key] = _absolute_source(sources)
    return cfg


def _absolute_judge_paths(judge: DictConfig) -> None:
    """The judge's local files made absolute: reward-function files, models, a template file."""
    from preftune.modeling.judges import POLICY

    if isinstance(judge.function, str):
        judge.function = _absolute_function(judge.function)
    elif judge.function is not None:
        judge.function = [_absolute_function(spec) for spec in judge.function]
    if judge.reward_model is not None:
        judge.reward_model = _absolute_if_local(judge.reward_model)
    if judge.llm.path is not None and judge.llm.path != POLICY:
        judge.llm.path = _absolute_if_local(judge.llm.path)
    if judge.llm.template is not None and "{completion}" not in judge.llm.template:
        judge.llm.template = _absolute_if_local(judge.llm.template)


def _absolute_function(spec: str) -> str:
    """``file.py:name`` with the file's path made absolute (``package.module:name`` stays as it is)."""
    where, sep, name = spec.rpartition(":")
    return f"{_absolute_if_local(where)}:{name}" if sep and where.endswith(".py") else spec


def _absolute_source(source: Any) -> Any:
    """A data source with its local path made absolute: a path, or a ``{path: ..., weight: ...}`` mixture
    entry (a ``{hub: ...}`` dataset stays as it is)."""
    if isinstance(source, DictConfig):
        if source.get("path") is not None:
            source.path = _absolute_if_local(source.path)
        return source
    return _absolute_if_local(source)


def _absolute_if_local(path: str) -> str:
    """``path`` resolved if it exists here (a Hub id stays as it is)."""
    local = Path(path).expanduser()
    return str(local.resolve()) if local.exists() else path
