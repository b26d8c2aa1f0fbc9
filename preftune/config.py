"""The config's schema and its loading: every section a dataclass (each key's type, default and meaning),
merged as an OmegaConf structured config from the defaults, a user's YAML file (or ``preset:NAME``) and
dotted ``key=value`` overrides.

OmegaConf refuses unknown keys and values it cannot convert to a key's type; ``read_config`` turns its errors
into one line naming the key, the nearest valid key and the file or override it came from, and refuses the
conversions OmegaConf would make silently (``1`` for ``true``, ``5`` for a string). Rules between keys live in
``preftune.config_checks``; ``preftune/configs/default.yaml`` is the same defaults, commented for users
(``tests/test_config.py`` holds the two equal).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf._yaml import get_yaml_loader
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from preftune.errors import ConfigError

PRESET = "preset:"


def free_form(accepts: tuple[type, ...], expected: str, nullable: bool) -> dict[str, Any]:
    """The field metadata of a key that takes more than one kind of value (typed ``Any`` for OmegaConf):
    ``accepts`` are the Python types allowed, ``expected`` says so in an error; a later layer replaces the
    value whole."""
    return {"accepts": accepts, "expected": expected, "nullable": nullable}


PATHS = (str, list, dict)  # a path, a {path|hub: ...} mapping, or a list of them
SOURCES = "a path or a list of paths"


# ---------------------------------------------------------------- the sections


@dataclass
class LoraConfig:
    """LoRA adapters (peft); the reference is then the policy with adapters off."""

    r: int = 0  # rank; 0: full fine-tuning
    alpha: int = 16  # LoRA scaling numerator (scale = alpha / r)
    dropout: float = 0.0  # dropout on the adapters' input
    # null: every linear layer of the blocks (peft's "all-linear")
    target_modules: Any = field(
        default=None, metadata=free_form((list, str), "a list or a string", nullable=True)
    )
    use_dora: bool = False  # DoRA: weight-decomposed LoRA (a learnt magnitude per output feature)
    init_from: str | None = None  # a PEFT adapter directory to continue training


@dataclass
class ModelConfig:
    """The policy: where it comes from and how it runs."""

    path: str = MISSING  # Hugging Face model directory or Hub id
    dtype: str = "float32"  # float32 | bfloat16 | float16: the weights' dtype
    trust_remote_code: bool = False  # run the model's own code from its directory / Hub repo
    disable_dropout: bool = True  # dropout makes log-probs noisy: off in the policy unless asked
    attn_implementation: str | None = None  # null: preftune_varlen when packed, else transformers' pick
    logprob_chunk_size: int | None = None  # tokens per lm-head / log-softmax chunk; null: by vocab size
    autocast: str | None = None  # null | bfloat16 | float16: autocast the transformer
    activation_checkpointing: bool = False  # recompute the policy's block activations in backward
    compile: bool = False  # torch.compile the transformer of policy and reference
    load_in_4bit: bool = False  # QLoRA: base frozen in 4 bits; needs lora.r or lora.init_from
    router_aux_loss_coef: float | None = (
        None  # mixture-of-experts: load-balancing loss weight; null: the model's
    )
    # global_batch | micro_batch: the balancing loss's expert statistics over the whole global batch (every
    # micro-batch and rank) or over each micro-batch (transformers' way; the objective depends on the split)
    router_aux_loss_scope: str = "global_batch"
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class ColumnsConfig:
    """The data file's column for each of preftune's names (null: the same name)."""

    prompt: str | None = None  # e.g. question
    chosen: str | None = None  # e.g. response_j
    rejected: str | None = None  # e.g. response_k
    chosen_reward: str | None = None  # e.g. score_chosen
    rejected_reward: str | None = None  # e.g. score_rejected


@dataclass
class DataConfig:
    """The preference pairs and how they are batched."""

    # .jsonl, .json (array), .parquet, save_to_disk dir, {hub: ID, ...}, or a list ({path|hub: ..., weight: W})
    train: Any = field(default=MISSING, metadata=free_form(PATHS, SOURCES, nullable=False))
    # same kinds as train; null: no validation (or see validation_fraction)
    validation: Any = field(default=None, metadata=free_form(PATHS, SOURCES, nullable=True))
    validation_fraction: float | None = None  # instead of validation: hold out this fraction of train
    format: str = (
        "auto"  # auto (per file) | nemo | nemo_rl | trl | trl_conversational | trl_implicit | tokenized
    )
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    completions: str = "best_vs_worst"  # nemo_rl with > 2 completions: best_vs_worst | all_pairs
    chat_template: str | None = None  # a named template, or Jinja (inline or a file); null: the tokenizer's
    max_seq_length: int = 1024  # prompt + one response, in tokens
    micro_batch_size: int = 1  # pairs per forward on each rank (rows per forward with packing)
    packing: bool = False  # pack several pairs per row (up to pack_length tokens)
    share_prompt: bool = False  # lay a pair out as prompt, chosen, rejected: the prompt processed once
    pack_length: int | None = None  # real tokens per packed row; null: 2 x max_seq_length
    global_batch_size: int = 8  # pairs per optimizer step over all ranks
    seed: int = 1234  # data order and the validation_fraction split
    num_workers: int = 0  # DataLoader worker processes
    cache_dir: str | None = None  # tokenization cache; null: <output_dir>/cache/tokenized


@dataclass
class DPOConfig:
    """The preference loss (or mixture of losses) and its coefficients."""

    ref_policy_kl_penalty: float = 0.1  # beta (IPO's tau, ORPO's lambda, SimPO's reward scale)
    # a name from the README's loss table, or a list of names (a mixture)
    preference_loss: Any = field(
        default="dpo", metadata=free_form((str, list), "a string or a list", nullable=False)
    )
    preference_loss_weights: list[float] | None = None  # with a list of losses: one weight each
    preference_average_log_probs: bool | None = None  # average (not sum) response log-probs; null: per loss
    sft_average_log_probs: bool = False  # average (not sum) chosen log-probs in the SFT loss
    gt_reward_scale: float = 1.0  # scales ground-truth reward differences (rpo_*)
    preference_loss_weight: float = 1.0  # weight of the preference loss
    sft_loss_weight: float = 0.0  # weight of the NLL of the chosen response
    label_smoothing: float = 0.0  # cDPO epsilon for dpo/aot/aot_pair; epsilon of robust and exo_pair
    simpo_gamma: float = 0.5  # SimPO target margin gamma
    rdpo_alpha: float = 0.0  # R-DPO length penalty alpha


@dataclass
class SchedConfig:
    """The learning-rate schedule."""

    name: str = "cosine_with_warmup"  # the schedule
    warmup_steps: int = 0  # linear warm-up steps
    min_lr: float = 0.0  # the cosine's floor
    max_steps: int | None = None  # length of the cosine; null: the run's max_steps


@dataclass
class OptimConfig:
    """The optimizer."""

    name: str = "adamw"  # the optimizer
    lr: float = 1.0e-6  # peak learning rate
    weight_decay: float = 0.0  # decoupled weight decay (not on biases and norms)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])  # Adam's beta1, beta2
    eps: float = 1.0e-8  # Adam's epsilon
    sched: SchedConfig = field(default_factory=SchedConfig)


@dataclass
class SamplesConfig:
    """Greedy generations for the first validation prompts at each validation."""

    num_prompts: int = 0  # how many (0: off); written to <output_dir>/samples.jsonl and the trackers
    max_new_tokens: int = 64  # tokens generated per prompt (also the judged generations' length)


@dataclass
class KeepBestConfig:
    """With keep_last: also keep the n checkpoints whose validation metric is best."""

    metric: str | None = None  # e.g. val/loss; null: off
    mode: str = "min"  # min | max
    n: int = 1  # how many


@dataclass
class TrainerConfig:
    """The training loop: limits, validation, checkpoints."""

    max_epochs: int | None = 1  # the run stops at the first limit reached; -1 or null: no limit
    max_steps: int | None = -1  # -1 or null: no limit (not both off); the start line names the limit
    val_check_interval: int | float = 100  # int: every N steps; float in (0, 1]: a fraction of an epoch
    save_interval: int = 100  # steps between checkpoints (one is always written at the end)
    limit_val_batches: int | float = 1.0  # int: at most N global batches; float: a fraction
    gradient_clip_val: float | None = 1.0  # 0 or null: no clipping
    max_time: str | int | float | None = None  # DD:HH:MM:SS (or seconds): validate, save and stop before it
    seed: int = 1234  # weights-independent randomness (RNG state is checkpointed)
    log_every_n_steps: int = 1  # train metrics to metrics.jsonl / trackers every N steps
    samples: SamplesConfig = field(default_factory=SamplesConfig)
    judge_prompts: int = 0  # judged validation (needs judge.*): the first N validation prompts; 0: off
    val_before_training: bool = True  # validate once before the first step (logged as step 0)
    keep_last: int | None = None  # keep the N newest checkpoints; null: all
    keep_best: KeepBestConfig = field(default_factory=KeepBestConfig)
    max_skipped_steps: int = 5  # stop after this many NaN/inf steps in a row


@dataclass
class WandbConfig:
    """Weights & Biases (preftune[wandb]); the run id is kept in <output_dir>/trackers.json."""

    project: str | None = None  # null: off; a project name: log a run there
    entity: str | None = None  # null: your default entity
    name: str | None = None  # run name; null: W&B picks one
    tags: list[str] = field(default_factory=list)  # the run's tags
    mode: str = "online"  # online | offline | disabled


@dataclass
class MlflowConfig:
    """MLflow (preftune[mlflow]); the run id is kept in <output_dir>/trackers.json."""

    tracking_uri: str | None = None  # null: off; a server URL, sqlite:///mlflow.db or file:./mlruns
    experiment: str = "preftune"  # experiment name (created if missing)
    run_name: str | None = None  # null: MLflow picks one


@dataclass
class LoggerConfig:
    """Trackers beside metrics.jsonl (rank 0 only)."""

    tensorboard: bool = False  # true: event files in <output_dir>/tensorboard
    wandb: WandbConfig = field(default_factory=WandbConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)


@dataclass
class ReferenceConfig:
    """The reference model of the losses that use one."""

    path: str | None = None  # a directory or Hub id (same tokenizer); null: the starting policy
    mode: str = "online"  # online: a forward every step | precompute: one pass before training, cached
    cache_dir: str | None = (
        None  # precompute's log-probs cache (keyed by data and model); null: <output_dir>/cache/reference
    )


@dataclass
class DistributedConfig:
    """Multi-process training (used when launched with torchrun / SLURM)."""

    strategy: str = "ddp"  # ddp | fsdp2 (policy and reference sharded)
    tensor_parallel: int = 1  # T: ranks splitting each block's weights (Llama-shaped families; needs fsdp2)
    context_parallel: int = 1  # C: ranks splitting each packed row (packing / share_prompt; needs fsdp2)


@dataclass
class OnlineConfig:
    """Online DPO: each step the policy samples completions of a global batch of prompts, a judge scores
    them, and the pairs they give train it."""

    enabled: bool = False  # data.train gives prompts; data.global_batch_size counts prompts
    num_generations: int = 4  # K completions sampled per prompt (>= 2; spin: >= 1)
    max_new_tokens: int = 64  # a completion's length limit (one that reaches it never ended)
    temperature: float = 1.0  # sampling temperature (0: greedy)
    top_p: float = 1.0  # nucleus sampling: the most likely tokens holding this much probability
    top_k: int = 0  # only the k most likely tokens (0: all)
    pairing: str = "best_vs_worst"  # best_vs_worst | all_pairs | spin
    min_reward_gap: float = 0.0  # a pair whose reward gap is <= this is a tie, dropped
    missing_eos_penalty: float | None = None  # subtracted from a never-ended completion's reward
    iterations: int | None = None  # iterative DPO: N rounds of generate, judge, pair, train
    prompts_per_iteration: int | None = None  # iterative: prompts per iteration (null: all)
    reference: str = "initial"  # iterative: initial | previous


@dataclass
class LLMJudgeConfig:
    """A causal LM grading each completion with a template; its greedy "Score: N" is the reward."""

    path: str | None = None  # a directory or Hub id, or "policy": the model being trained (self-rewarding)
    template: str | None = (
        None  # null: the shipped 0-5 rubric; else a template (or a file) with {prompt}, {completion}
    )
    max_new_tokens: int = 128  # the judge's answer length (it ends with "Score: N")


@dataclass
class JudgeConfig:
    """What scores a completion (online training, judged evaluation); at most one kind is set."""

    # "path/to/file.py:name" (imports that file: runs its code) or "package.module:name", or a list of them
    function: Any = field(default=None, metadata=free_form((str, list), "a string or a list", nullable=True))
    weights: list[float] | None = None  # with several functions: one weight each (null: all 1.0)
    reward_model: str | None = None  # a directory or Hub id of a sequence-classification model, one label
    llm: LLMJudgeConfig = field(default_factory=LLMJudgeConfig)
    batch_size: int = 8  # completions per judge forward (reward model, LLM judge)


@dataclass
class PreftuneConfig:
    """A whole run."""

    output_dir: str = "runs/dpo"  # checkpoints/, metrics.jsonl and caches; re-running resumes from it
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)


# ---------------------------------------------------------------- loading


def default_config() -> DictConfig:
    """Every key preftune reads, with its default: the structured config of ``PreftuneConfig``."""
    return OmegaConf.structured(PreftuneConfig)


def read_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Defaults, then the YAML file at ``path`` (or ``preset:NAME``, a packaged preset), then ``key=value``
    overrides. Types and keys are checked; rules between keys are not (``config_checks.load_config``)."""
    cfg = default_config()
    layers: list[tuple[str, dict]] = []
    if path is not None and str(path).startswith(PRESET):
        layers.append((str(path), parse_yaml(preset_text(str(path).removeprefix(PRESET)), str(path))))
    elif path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        layers.append((str(path), parse_yaml(path.read_text(), str(path))))
    for item in overrides:
        layers.append((f"override '{item}'", _parse_override(item)))
    for source, layer in layers:
        _check_values(layer, PreftuneConfig, source)
        _clear_free_form(cfg, layer, PreftuneConfig)
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as e:
            raise _merge_error(e, layer, source) from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"required config keys not set: {', '.join(missing)}")
    return cfg


def parse_yaml(text: str, source: str) -> dict:
    """A YAML mapping, read with YAML 1.2's integers (``max_time: 1:00:00:00`` stays a string)."""
    try:
        loaded = yaml.load(text, Loader=_yaml_loader())
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: invalid YAML: {e}") from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys")
    return loaded


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


def _parse_override(item: str) -> dict:
    """``a.b.c=value`` as ``{a: {b: {c: value}}}``, the value read as YAML."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override '{item}' is not of the form key=value")
    try:
        layer: Any = yaml.load(value, Loader=_yaml_loader()) if value else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{item}': invalid YAML value: {e}") from None
    for part in reversed(key.strip().split(".")):
        layer = {part: layer}
    return layer


# ---------------------------------------------------------------- types


def _accepted(hint: Any, meta: dict) -> tuple[tuple[type, ...], bool, str, Any]:
    """The Python types a key of type ``hint`` takes, whether null is one, how an error says it, and the
    type of a list's items (None: not a typed list)."""
    if "accepts" in meta:
        return meta["accepts"], meta["nullable"], meta["expected"], None
    args = (
        typing.get_args(hint)
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
        else (hint,)
    )
    nullable = type(None) in args
    accepted = tuple(typing.get_origin(a) or a for a in args if a is not type(None))
    item = next((typing.get_args(a)[0] for a in args if typing.get_origin(a) is list), None)
    if float in accepted:
        accepted = (*accepted, int)
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list"}
    if item is not None:
        words[list] = (
            "a list of " + {float: "numbers", int: "integers", str: "strings", bool: "booleans"}[item]
        )
    said = ["a number" if t in (int, float) and float in accepted else words[t] for t in accepted]
    return accepted, nullable, " or ".join(dict.fromkeys(said)), item


def _matches(value: Any, accepted: tuple[type, ...]) -> bool:
    if isinstance(value, bool):  # YAML's true is an int to Python: only a bool key takes it
        return bool in accepted
    return isinstance(value, accepted)


def _check_values(layer: dict, schema: type, source: str, prefix: str = "") -> None:
    """Every value ``layer`` sets has its key's type, strictly (OmegaConf would turn ``1`` into ``true`` and
    ``5`` into ``"5"``): ``optim.lr=abc``, ``data.packing=1``, ``data.train=null`` and ``model=abc`` are
    refused. Unknown keys are left to OmegaConf's merge."""
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in layer.items():
        if key not in fields:
            continue
        path, hint = f"{prefix}{key}", hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(
                    f"{source}: {path}={value!r}: '{path}' is a section; set its keys ({path}.<name>=...)"
                )
            _check_values(value, hint, source, path + ".")
            continue
        accepted, nullable, expected, item = _accepted(hint, dict(fields[key].metadata))
        if value is None:
            if not nullable:
                raise ConfigError(f"{source}: {path} cannot be null: set it to {expected}")
        elif not _matches(value, accepted) or (
            item is not None and not all(_matches(v, _accepted(item, {})[0]) for v in value)
        ):
            raise ConfigError(f"{source}: {path}={value!r}: expected {expected}")


def _clear_free_form(cfg: DictConfig, layer: dict, schema: type) -> None:
    """Free-form keys the layer sets are replaced whole (a list never merges into a mapping)."""
    for f in dataclasses.fields(schema):
        if f.name not in layer:
            continue
        hint = typing.get_type_hints(schema)[f.name]
        if dataclasses.is_dataclass(hint):
            _clear_free_form(cfg[f.name], layer[f.name], hint)
        elif "accepts" in f.metadata and layer[f.name] is not None:
            cfg[f.name] = None


def _merge_error(e: OmegaConfBaseException, layer: dict, source: str) -> ConfigError:
    """OmegaConf's error as our one line: the key, and for an unknown key the nearest valid one."""
    key = str(getattr(e, "full_key", None) or "")
    if isinstance(e, ConfigKeyError):
        nearest = difflib.get_close_matches(key, known_keys(), n=1, cutoff=0.5)
        hint = f" Did you mean '{nearest[0]}'?" if nearest else ""
        return ConfigError(f"{source}: unknown config key '{key}'.{hint}")
    value = _lookup(layer, key)
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return ConfigError(f"{source}: {key}={value!r}: {reason}")


def _lookup(layer: Any, key: str) -> Any:
    for part in re.findall(r"[^.\[\]]+", key):
        if isinstance(layer, dict):
            layer = layer.get(part)
        elif isinstance(layer, list) and part.isdigit() and int(part) < len(layer):
            layer = layer[int(part)]
        else:
            return None
    return layer


def known_keys(schema: type = PreftuneConfig, prefix: str = "") -> list[str]:
    """Every key path of the schema, sections included (``model``, ``model.lora``, ``model.lora.r`` ...)."""
    keys = []
    for name, hint in typing.get_type_hints(schema).items():
        keys.append(prefix + name)
        if dataclasses.is_dataclass(hint):
            keys.extend(known_keys(hint, f"{prefix}{name}."))
    return keys


# ---------------------------------------------------------------- presets and max_time


def _presets_dir() -> Any:
    return resources.files("preftune").joinpath("configs/presets")


def preset_names() -> list[str]:
    """The packaged configs (``preftune/configs/presets/NAME.yaml``) usable as ``--config preset:NAME``."""
    return sorted(p.name.removesuffix(".yaml") for p in _presets_dir().iterdir() if p.name.endswith(".yaml"))


def preset_text(name: str) -> str:
    """The YAML of preset ``name``; ``ConfigError`` naming the presets when there is none of that name."""
    if name not in preset_names():
        nearest = difflib.get_close_matches(name, preset_names(), n=1)
        hint = f" Did you mean '{PRESET}{nearest[0]}'?" if nearest else ""
        raise ConfigError(f"unknown preset '{name}'.{hint} Presets: {', '.join(preset_names())}")
    return _presets_dir().joinpath(f"{name}.yaml").read_text()


def parse_max_time(value: str | float) -> float:
    """``trainer.max_time`` in seconds: ``DD:HH:MM:SS`` (leading fields optional) or a number of seconds."""
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
