"""Every rule between a run's settings, each written once, and the loading that applies them.

``load_config`` reads a config (``preftune.config.read_config``: keys and types, checked against the
dataclasses) and then ``check_config``: value ranges and rules between keys that the modules reading them
would otherwise break on mid-run. ``check_environment`` reads what the config points at (the output
directory, the model's directory or Hub id, the launcher's ranks) and runs before any model or data is
loaded, in ``train``, ``inspect`` and ``eval`` alike. Where a rule also guards a library function that runs
without a config (a loss name, the robust loss's epsilon, packed attention, checkpoint retention, a model
family's attention layers), both call the one function that holds it. Each raises ``ConfigError``: one line
naming the key, what is wrong and what to set instead.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig

from preftune.config import (
    DataConfig,
    ModelConfig,
    PreftuneConfig,
    TrainerConfig,
    parse_max_time,
    read_config,
)
from preftune.data.pairing import PAIRINGS
from preftune.data.visibility import VARLEN, check_packed_attention, packed_attention
from preftune.data.windows import layer_windows
from preftune.errors import ConfigError
from preftune.training.launcher import env_world_size
from preftune.training.progress import limit
from preftune.training.retention import Retention

# The rules that need torch or transformers import them where they run, so that importing this module (the
# CLI does, before any config is read) stays light.

DTYPES = ("float32", "bfloat16", "float16")  # model.dtype
AUTOCAST = (None, "bfloat16", "float16")  # model.autocast
REFERENCE_MODES = ("online", "precompute")  # reference.mode


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Defaults, then the YAML file at ``path`` (or ``preset:NAME``), then ``key=value`` overrides, checked:
    keys and types (``read_config``), then every rule of ``check_config``."""
    cfg = read_config(path, overrides)
    check_config(cfg)
    return cfg


def check_config(cfg: PreftuneConfig) -> None:
    """The rules a config must follow on its own (no file or model is looked at). The rules that read names
    from modules importing torch come last, so that the other mistakes are said without that import."""
    data_ranks = _check_mesh(cfg, env_world_size())
    # online per step, the global batch is prompts; iterative DPO trains its pairs offline
    _check_data(cfg.data, data_ranks, cfg.online.enabled and cfg.online.iterations is None)
    _check_trainer(cfg.trainer)
    if len(cfg.optim.betas) != 2:
        raise ConfigError("optim.betas must be a list of two floats")
    from preftune.modeling.parallel import STRATEGIES
    from preftune.training.optim import OPTIMIZERS, SCHEDULES

    _check_model(cfg)
    _check_losses(cfg)
    if cfg.optim.name not in OPTIMIZERS:
        raise ConfigError(f"optim.name={cfg.optim.name!r}: use one of {', '.join(OPTIMIZERS)}")
    if cfg.optim.sched.name not in SCHEDULES:
        raise ConfigError(f"optim.sched.name={cfg.optim.sched.name!r}: use one of {', '.join(SCHEDULES)}")
    if cfg.distributed.strategy not in STRATEGIES:
        raise ConfigError(f"distributed.strategy={cfg.distributed.strategy}: use {' or '.join(STRATEGIES)}")
    from preftune.modeling.judges import check_judge_settings

    check_judge_settings(cfg.judge)
    check_online(cfg)
    _check_judged_validation(cfg)


def _check_judged_validation(cfg: PreftuneConfig) -> None:
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


def _check_mesh(cfg: PreftuneConfig, world: int) -> int:
    """``distributed.tensor_parallel`` / ``context_parallel``: sizes that divide the ranks launched, on the
    layouts they support. Returns the number of data-parallel groups (the ranks that read different pairs)."""
    tp, cp = cfg.distributed.tensor_parallel, cfg.distributed.context_parallel
    if tp < 1 or cp < 1:
        raise ConfigError(
            f"distributed.tensor_parallel={tp}, distributed.context_parallel={cp}: each must be >= 1 (1: off)"
        )
    if tp * cp == 1:
        return world
    keys = f"distributed.tensor_parallel={tp} x distributed.context_parallel={cp}"
    if world % (tp * cp):
        raise ConfigError(
            f"{keys} = {tp * cp} ranks per data-parallel group does not divide the {world} rank(s) launched: "
            f"launch a multiple of {tp * cp} processes (torchrun --nproc-per-node={tp * cp} ...), or set both to 1"
        )
    if cfg.distributed.strategy != "fsdp2":
        raise ConfigError(
            f"{keys} needs distributed.strategy=fsdp2 (the weights are sharded over the device mesh), "
            f"not {cfg.distributed.strategy}"
        )
    if cfg.online.enabled:
        raise ConfigError(
            f"{keys} with online.enabled=true is not supported yet: set both to 1 for online DPO"
        )
    if cp > 1:
        if not (cfg.data.packing or cfg.data.share_prompt):
            raise ConfigError(
                f"distributed.context_parallel={cp} splits packed rows: set data.packing=true or "
                "data.share_prompt=true"
            )
        attention = packed_attention(cfg.model.attn_implementation, True)
        if attention != VARLEN:
            raise ConfigError(
                f"distributed.context_parallel={cp} needs model.attn_implementation={VARLEN} (or null), not "
                f"{attention}: a mask over the whole row cannot be split"
            )
    return world // (tp * cp)


def _check_data(data: DataConfig, world: int, online: bool) -> None:
    """``data.*``: batch sizes and their divisibility over the data-parallel ranks (``world``), lengths, the
    validation split."""
    if data.micro_batch_size < 1 or data.global_batch_size < 1:
        raise ConfigError("data.micro_batch_size and data.global_batch_size must be >= 1")
    if data.max_seq_length < 2:
        raise ConfigError("data.max_seq_length must be >= 2 (one prompt token and one response token)")
    if isinstance(data.train, ListConfig) and not data.train:
        raise ConfigError("data.train is an empty list: set it to a data file, a directory or a list of them")
    fraction = data.validation_fraction
    if fraction is not None and data.validation:
        raise ConfigError("set data.validation or data.validation_fraction, not both")
    if fraction is not None and not 0 < fraction < 1:
        raise ConfigError(f"data.validation_fraction={fraction}: must be between 0 and 1")
    # Each rank takes an equal share of the pairs; unpacked, in whole micro-batches (packing counts rows;
    # online, the global batch is prompts).
    unit, why = (
        (world, f"{world} ranks")
        if data.packing or online
        else (data.micro_batch_size * world, f"data.micro_batch_size {data.micro_batch_size} x {world} ranks")
    )
    if data.global_batch_size % unit:
        raise ConfigError(
            f"data.global_batch_size ({data.global_batch_size}) must be a multiple of {unit} ({why})"
        )
    if (
        (data.packing or data.share_prompt)
        and data.pack_length is not None
        and data.pack_length < 2 * data.max_seq_length
    ):
        raise ConfigError(
            f"data.pack_length={data.pack_length}: a pair can take 2 x data.max_seq_length = "
            f"{2 * data.max_seq_length} tokens; raise data.pack_length or lower data.max_seq_length"
        )


def _check_model(cfg: PreftuneConfig) -> None:
    """``model.*``: dtypes, the balancing loss's scope, and the attention a packed / shared-prompt layout
    needs."""
    from preftune.modeling.router import SCOPES

    model, data = cfg.model, cfg.data
    if model.dtype not in DTYPES:
        raise ConfigError(f"model.dtype={model.dtype}: use {', '.join(DTYPES[:-1])} or {DTYPES[-1]}")
    if model.autocast not in AUTOCAST:
        raise ConfigError(f"model.autocast={model.autocast}: use null, bfloat16 or float16")
    if model.router_aux_loss_scope not in SCOPES:
        raise ConfigError(
            f"model.router_aux_loss_scope={model.router_aux_loss_scope!r}: use one of {', '.join(SCOPES)}"
        )
    packed = data.packing or data.share_prompt
    attention = packed_attention(model.attn_implementation, packed)
    if model.compile and attention == VARLEN:
        raise ConfigError(
            f"model.compile does not support {VARLEN} attention (its per-sequence loop would recompile on "
            "every batch); set model.attn_implementation=sdpa or model.compile=false"
        )
    if packed:
        check_packed_attention(attention)


def _check_trainer(trainer: TrainerConfig) -> None:
    """``trainer.*``: intervals, limits, checkpoint retention, the NaN/inf skip limit."""
    interval = trainer.val_check_interval
    if isinstance(interval, float) and not 0 < interval <= 1:
        raise ConfigError(f"trainer.val_check_interval={interval}: a float must be a fraction in (0, 1]")
    if isinstance(interval, int) and interval < 1:
        raise ConfigError(f"trainer.val_check_interval={interval}: an int must be >= 1 (steps)")
    if trainer.save_interval < 1:
        raise ConfigError("trainer.save_interval must be >= 1")
    _check_run_length(trainer)
    if trainer.max_time is not None:
        parse_max_time(trainer.max_time)
    Retention.from_config(trainer)  # trainer.keep_last, trainer.keep_best
    if trainer.max_skipped_steps < 1:
        raise ConfigError(
            f"trainer.max_skipped_steps={trainer.max_skipped_steps}: use a number of steps >= 1"
        )


def _check_run_length(trainer: TrainerConfig) -> None:
    """``trainer.max_epochs`` and ``trainer.max_steps``: each a number >= 1 or no limit (-1 / null, the one
    rule: ``progress.limit``), not both off."""
    for key in ("max_epochs", "max_steps"):
        value = limit(getattr(trainer, key))
        if value is not None and value < 1:
            raise ConfigError(f"trainer.{key}={value}: use a number >= 1, or -1 / null for no limit")
    if limit(trainer.max_epochs) is None and limit(trainer.max_steps) is None:
        raise ConfigError(
            "trainer.max_epochs and trainer.max_steps are both off (-1 / null): set one of them to end the run"
        )


def _check_losses(cfg: PreftuneConfig) -> None:
    """``dpo.*`` and ``reference.*``: known loss names, no mix of reference-free and other losses, one weight
    per loss, beta > 0, and a reference only for losses that use one."""
    from preftune import losses

    names = losses.loss_names(cfg.dpo.preference_loss)
    unknown = [n for n in names if n not in losses.LOSS_NAMES]
    if unknown:
        raise ConfigError(f"dpo.preference_loss: {losses.unknown_loss(unknown[0])}")
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
    if "robust" in names and (problem := losses.robust_epsilon_problem(cfg.dpo.label_smoothing)):
        raise ConfigError(f"dpo.label_smoothing={cfg.dpo.label_smoothing}: {problem}")
    if cfg.reference.mode not in REFERENCE_MODES:
        raise ConfigError(f"reference.mode={cfg.reference.mode}: use online or precompute")
    if cfg.reference.path is not None and free == {True}:
        raise ConfigError(
            f"reference.path is set but dpo.preference_loss ({', '.join(names)}) uses no reference: "
            "remove reference.path"
        )


def check_online(cfg: PreftuneConfig) -> None:
    """``online.*``: the sampling settings, the pairing, and what online training cannot combine with."""
    from preftune.modeling.judges import judge_is_set

    online, least = cfg.online, 1 if cfg.online.pairing == "spin" else 2
    if not online.enabled:
        return
    rules = [
        (online.pairing in PAIRINGS, f"online.pairing={online.pairing!r}: use one of {', '.join(PAIRINGS)}"),
        (
            online.num_generations >= least,
            f"online.num_generations={online.num_generations}: a pair needs two completions of a prompt; "
            f"set it to {least} or more",
        ),
        (online.max_new_tokens >= 1, f"online.max_new_tokens={online.max_new_tokens}: must be >= 1"),
        (
            cfg.data.max_seq_length > online.max_new_tokens,
            f"data.max_seq_length={cfg.data.max_seq_length} leaves no room for a prompt before "
            f"online.max_new_tokens={online.max_new_tokens}: raise it (prompt + completion)",
        ),
        (online.temperature >= 0, f"online.temperature={online.temperature}: must be >= 0 (0: greedy)"),
        (0 < online.top_p <= 1, f"online.top_p={online.top_p}: must be in (0, 1]"),
        (online.top_k >= 0, f"online.top_k={online.top_k}: must be >= 0 (0: all tokens)"),
        (online.min_reward_gap >= 0, f"online.min_reward_gap={online.min_reward_gap}: must be >= 0"),
        (
            online.missing_eos_penalty is None or online.missing_eos_penalty >= 0,
            f"online.missing_eos_penalty={online.missing_eos_penalty}: must be >= 0 (or null)",
        ),
        (
            judge_is_set(cfg.judge) or online.pairing == "spin",
            "online.enabled needs a judge to score the completions: set judge.function, judge.reward_model "
            "or judge.llm.path",
        ),
        (
            cfg.reference.mode != "precompute" or online.iterations is not None,
            "reference.mode=precompute cannot apply online (the completions are new at every step): set "
            "reference.mode=online (it applies to iterative DPO, online.iterations)",
        ),
        (
            online.iterations is None or online.iterations >= 1,
            f"online.iterations={online.iterations}: must be >= 1 (or null: online DPO per step)",
        ),
        (
            online.prompts_per_iteration is None or online.prompts_per_iteration >= 1,
            f"online.prompts_per_iteration={online.prompts_per_iteration}: must be >= 1 (or null: every prompt)",
        ),
        (
            online.reference in ("initial", "previous"),
            f"online.reference={online.reference!r}: use initial (the starting model) or previous (the "
            "previous iteration's policy)",
        ),
        (
            cfg.data.validation_fraction is None,
            "data.validation_fraction does not apply online (data.train holds prompts): give data.validation "
            "pairs instead",
        ),
    ]
    broken = [message for ok, message in rules if not ok]
    if broken:
        raise ConfigError(broken[0])


def check_environment(cfg: DictConfig, *, tokenizer_only: bool = False) -> None:
    """What the config points at exists and fits: a writable ``output_dir``, a model at ``model.path`` (a
    directory with ``config.json`` and weights, or a Hub id) of a family the chosen layout supports, the same
    for ``reference.path``, and a launcher with what ``torch.distributed`` needs. Runs before the model or
    data is loaded. ``tokenizer_only`` (``inspect``): a local ``model.path`` may hold just a tokenizer."""

    _check_output_dir(Path(cfg.output_dir))
    model_config = _model_config(cfg.model.path, cfg.model.trust_remote_code, "model.path", tokenizer_only)
    if model_config is not None and (cfg.data.packing or cfg.data.share_prompt):
        layer_windows(model_config)  # a ConfigError for what packed rows cannot lay out
    if model_config is not None and cfg.distributed.context_parallel > 1:
        _check_context_parallel_model(cfg, model_config)
    models = {"model.path": (cfg.model.path, model_config)}
    if cfg.reference.path is not None and not tokenizer_only:
        reference = _model_config(cfg.reference.path, cfg.model.trust_remote_code, "reference.path", False)
        models["reference.path"] = (cfg.reference.path, reference)
    if cfg.distributed.tensor_parallel > 1 and not tokenizer_only:
        _check_tensor_parallel(models, cfg.model, cfg.distributed.tensor_parallel)
    from preftune.modeling.judges import check_judge, judge_is_set

    if not tokenizer_only and judge_is_set(cfg.judge):
        check_judge(cfg.judge)  # resolves the reward functions, reads the judge model's config
    if cfg.model.lora.r > 0 and importlib.util.find_spec("peft") is None:
        raise ConfigError("model.lora.r > 0 needs peft: pip install 'preftune[lora]'")
    if env_world_size() > 1:
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise ConfigError(
                    f"{name} is not set: launch with torchrun, or export it in the SLURM script"
                )


def _check_tensor_parallel(
    models: dict[str, tuple[str, Any]], model: ModelConfig, tensor_parallel: int
) -> None:
    """Each model (key -> (path, its transformers config)) splits over ``tensor_parallel`` ranks, and the model
    settings that do not work split yet are off (DoRA, a 4-bit base, torch.compile)."""
    from preftune.modeling.tensor_parallel import tensor_parallel_problem

    for key, (path, model_config) in models.items():
        problem = tensor_parallel_problem(model_config, tensor_parallel)
        if problem is not None:
            raise ConfigError(f"{key}={path}: {problem}")
    unsupported = {
        "model.lora.use_dora": (model.lora.use_dora, "use plain LoRA"),
        "model.load_in_4bit": (model.load_in_4bit, "use LoRA on a full-precision base"),
        "model.compile": (model.compile, "set model.compile=false"),  # dynamo fails on the split embeddings
    }
    for key, (on, instead) in unsupported.items():
        if on:
            raise ConfigError(
                f"{key}=true with distributed.tensor_parallel={tensor_parallel} is not supported yet: "
                f"{instead}, or distributed.tensor_parallel=1"
            )


def _check_context_parallel_model(cfg: DictConfig, model_config: Any) -> None:
    """A mixture-of-experts policy's balancing loss counts each token's routing where the whole row is:
    under context parallelism each rank holds part of it, so that loss is refused rather than changed."""
    from preftune.modeling.router import router_loss

    if router_loss(model_config, cfg.model.router_aux_loss_coef, cfg.model.router_aux_loss_scope) is not None:
        raise ConfigError(
            f"distributed.context_parallel={cfg.distributed.context_parallel} with a {model_config.model_type} "
            "policy's router balancing loss is not supported yet: set model.router_aux_loss_coef=0 or "
            "distributed.context_parallel=1"
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


def _model_config(path: str, trust_remote_code: bool, key: str, tokenizer_only: bool) -> Any:
    """The ``transformers`` config of the model at ``path`` (a local directory, else a Hub id) named by
    ``key``; None for a local directory without ``config.json`` when ``tokenizer_only``."""
    from transformers import AutoConfig

    from preftune.modeling.hub import check_model_source

    check_model_source(path, key, tokenizer_only=tokenizer_only)
    local = Path(path).expanduser()
    if local.is_dir() and not (local / "config.json").is_file():
        return None  # a tokenizer alone (inspect): check_model_source refuses it otherwise
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}={path}: its config.json cannot be read: {_first_line(e)}") from None


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def absolute_paths(cfg: PreftuneConfig) -> DictConfig:
    """``cfg`` with ``output_dir``, the cache directories and local model and data paths made absolute, so the
    saved ``config.yaml`` and a LoRA adapter's ``base_model_name_or_path`` work from any directory."""
    cfg = cfg.copy()
    cfg.output_dir = str(Path(cfg.output_dir).expanduser().resolve())
    for section in (cfg.data, cfg.reference):
        if section.cache_dir:
            section.cache_dir = str(Path(section.cache_dir).expanduser().resolve())
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
