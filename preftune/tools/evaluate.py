"""``preftune eval``: the validation metrics of a checkpoint (full or LoRA), of ``model.path`` itself, or of
every checkpoint of a run, computed exactly as training's validation computes them (same batches,
micro-batches, layout and limit), with the reference the config describes. One process.

With a judge (``judge.*``) and ``trainer.judge_prompts`` > 0, the judged metrics of training's validation
too (``preftune.training.judged``: the reference's generations come from the run's cache when the config is
the run's). A judge that scores completions (``judge.function``, ``judge.reward_model``) is also checked
against the preference data: ``judge_pair_acc`` is the share of validation pairs whose chosen response it
scores strictly above the rejected one (RewardBench's accuracy; pairs it could not score left out), the
responses as the policy reads them (decoded tokens, cut to ``data.max_seq_length``).

``--all-checkpoints RUN_DIR`` evaluates each complete checkpoint in step order and keeps each result in
``RUN_DIR/eval_checkpoints.json`` as soon as it is done, so an interrupted evaluation, re-run, goes on
where it stopped (a checkpoint is redone only if it or the config changed).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from preftune.config import PreftuneConfig
from preftune.data.checked_file import content_digest
from preftune.data.dataset import PreferenceDataset
from preftune.data.loading import load_datasets, load_validation
from preftune.errors import ConfigError
from preftune.modeling.logprobs import causal_lm
from preftune.modeling.model import DPOModel
from preftune.modeling.parallel import DistInfo
from preftune.run_dir import RunDir
from preftune.training.checkpoint import Checkpointer
from preftune.training.console import quiet_libraries
from preftune.training.judged import build_run_judge, prepare_judged_validation
from preftune.training.loaders import build_dataloader, load_tokenizer, micro_batch_layout
from preftune.training.manifest import MANIFEST
from preftune.training.samples import greedy_generate
from preftune.training.stop_signals import EXIT_INTERRUPTED
from preftune.training.trainer import evaluate as evaluate_batches
from preftune.training.trainer import limit_batches

TABLE_METRICS = (
    "loss",
    "acc",
    "reward_margin_mean",
    "judge_reward",
    "win_rate",
    "lc_win_rate",
    "length_ratio",
)


def validation_set(cfg: PreftuneConfig, tokenizer: Any) -> PreferenceDataset:
    """The validation pairs training would use: ``data.validation``, or the ``data.validation_fraction`` split."""
    cache_dir = RunDir(cfg.output_dir).tokenized(cfg.data.cache_dir)
    if cfg.data.validation:
        return load_validation(cfg.data, tokenizer, cache_dir)
    if cfg.data.validation_fraction is not None:
        return load_datasets(cfg.data, tokenizer, cache_dir)[1]
    raise ConfigError("no validation data: set data.validation=FILE (or data.validation_fraction)")


def check_checkpoint(checkpoint: str | Path) -> Path:
    if not (Path(checkpoint) / "model").is_dir():
        raise ConfigError(
            f"--checkpoint {checkpoint}: not a checkpoint (expected output_dir/checkpoints/step_N)"
        )
    return Path(checkpoint)


class Evaluation:
    """What ``preftune eval`` builds once (tokenizer, validation pairs, the model with its starting weights and
    reference, the judged validation), then evaluates any number of checkpoints with."""

    def __init__(self, cfg: PreftuneConfig):
        quiet_libraries()
        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg)
        self.pairs: Any = validation_set(cfg, self.tokenizer)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = DPOModel.from_config(cfg).to(device)  # policy and reference from model.path
        self.model.train(False)
        self.judge = build_run_judge(cfg, self.model, self.tokenizer)
        # before any checkpoint is loaded: the reference's generations are the starting model's
        self.judged = prepare_judged_validation(
            cfg, self.model, self.tokenizer, self.pairs, self.judge, write=True
        )
        dataset, self.collate = micro_batch_layout(
            cfg, self.pairs, self.model, self.tokenizer.eos_token_id, device
        )
        self.loader = build_dataloader(dataset, cfg, DistInfo(device=device), train=False)

    @torch.no_grad()
    def metrics(self, checkpoint: Path | None) -> dict[str, float]:
        """Pair-weighted validation metrics of ``checkpoint``'s weights (None: the weights loaded last, the
        base model at first), and the judged metrics with a judge."""
        if checkpoint is not None:
            Checkpointer.load_weights(checkpoint, self.model)
        metrics, pairs = evaluate_batches(
            self.model,
            self.loader,
            lambda pairs: [(b, False) for b in self.collate(pairs)],
            self.cfg.trainer.limit_val_batches,
        )
        result = {**metrics, "pairs": pairs}
        if self.judged is not None:
            generations = greedy_generate(
                causal_lm(self.model.policy),
                [example["prompt_ids"] for example in self.judged.examples],
                self.cfg.trainer.samples.max_new_tokens,
                self.tokenizer.eos_token_id,
            )
            result.update(self.judged(generations, self.tokenizer, step=-1)[0])
        return result

    def judge_pair_accuracy(self) -> dict[str, float]:
        """``judge_pair_acc`` (see the module's docstring) over the pairs ``metrics`` evaluates; {} without a
        judge that scores completions."""
        judge = self.judge
        if judge is None or hasattr(judge, "compare"):  # an LLM judge: its own generations, not measured
            return {}
        num_batches = limit_batches(self.cfg.trainer.limit_val_batches, len(self.loader))
        count = min(len(self.pairs), num_batches * self.cfg.data.global_batch_size)
        examples = [self.pairs[i] for i in range(count)]
        decode = self.tokenizer.decode
        prompts = self.pairs.prompts(count)
        chosen = judge.score(
            prompts,
            [decode(e["chosen_ids"], skip_special_tokens=True) for e in examples],
            [e["chosen_ids"] for e in examples],
        ).rewards
        rejected = judge.score(
            prompts,
            [decode(e["rejected_ids"], skip_special_tokens=True) for e in examples],
            [e["rejected_ids"] for e in examples],
        ).rewards
        scored = [
            (c, r) for c, r in zip(chosen, rejected, strict=True) if not (math.isnan(c) or math.isnan(r))
        ]
        accuracy = sum(c > r for c, r in scored) / len(scored) if scored else math.nan
        return {"judge_pair_acc": accuracy, "judge_pairs": len(scored)}


def evaluate(cfg: PreftuneConfig, checkpoint: str | Path | None = None) -> dict[str, float]:
    """The metrics of ``checkpoint`` (``output_dir/checkpoints/step_N``), or of the base model when None,
    over (up to ``trainer.limit_val_batches`` of) the validation set."""
    path = check_checkpoint(checkpoint) if checkpoint is not None else None
    evaluation = Evaluation(cfg)
    return {**evaluation.metrics(path), **evaluation.judge_pair_accuracy()}


def print_metrics(metrics: dict[str, Any]) -> None:
    width = max(len(k) for k in metrics)
    for key, value in metrics.items():
        print(f"  {key:<{width}}  {value:.6g}" if isinstance(value, float) else f"  {key:<{width}}  {value}")


def run_eval(cfg: PreftuneConfig, checkpoint: str | None, json_path: str | None) -> int:
    """The CLI for one model: print a table of the metrics, optionally write them as JSON."""
    metrics = evaluate(cfg, checkpoint)
    what = checkpoint or f"{cfg.model.path} (base model)"
    print(f"[preftune] validation metrics of {what} on {metrics['pairs']} pairs")
    print_metrics(metrics)
    if json_path:
        report = {"checkpoint": checkpoint, "model": cfg.model.path, "metrics": metrics}
        write_json(Path(json_path), report)
        print(f"[preftune] wrote {json_path}")
    return 0


def write_json(path: Path, obj: Any) -> None:
    """Atomically (a kill leaves the old file or the new one)."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def checkpoint_key(path: Path) -> str:
    """A checkpoint's identity: its name and its manifest's hash (a checkpoint saved again is redone)."""
    return f"{path.name}:{hashlib.sha256((path / MANIFEST).read_bytes()).hexdigest()[:16]}"


def evaluate_checkpoints(cfg: PreftuneConfig, run_dir: str | Path) -> tuple[list[dict[str, Any]], Path]:
    """Every complete checkpoint of ``run_dir`` in step order, each result kept in ``eval_checkpoints.json`` as soon
    as it is done; results already there (same config, same checkpoint) are reused. Returns the rows (step,
    checkpoint, metrics) and the file."""
    run_dir = Path(run_dir)
    checkpoints = Checkpointer(run_dir).complete()
    if not checkpoints:
        raise ConfigError(
            f"--all-checkpoints {run_dir}: no complete checkpoint in {RunDir(run_dir).checkpoints}"
        )
    results_path = RunDir(run_dir).eval_checkpoints
    config = content_digest(OmegaConf.to_container(cfg, resolve=True))
    saved = json.loads(results_path.read_text()) if results_path.is_file() else {}
    done = saved.get("results", {}) if saved.get("config") == config else {}
    if saved and not done:
        print(f"[preftune] {results_path}: made with another config; evaluating every checkpoint again")
    evaluation = None
    try:
        for step, path in checkpoints:
            key = checkpoint_key(path)
            if key in done:
                print(f"[preftune] step {step}: evaluated before (kept in {results_path.name})")
                continue
            evaluation = evaluation or Evaluation(cfg)
            metrics = evaluation.metrics(path)
            done[key] = {"step": step, "checkpoint": str(path), "metrics": metrics}
            write_json(results_path, {"config": config, "results": done})
            print(f"[preftune] step {step}: {table_cells(metrics)}")
    finally:
        if done:
            write_json(results_path, {"config": config, "results": done})
    keys = {checkpoint_key(path) for _, path in checkpoints}
    return sorted(
        (row for key, row in done.items() if key in keys), key=lambda row: row["step"]
    ), results_path


def table_cells(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k} {metrics[k]:.4g}" for k in (*TABLE_METRICS, "judge_pair_acc") if k in metrics)


def print_table(rows: list[dict[str, Any]]) -> None:
    """One line per checkpoint: the step and the metrics of ``TABLE_METRICS`` it has."""
    columns = [m for m in TABLE_METRICS if any(m in row["metrics"] for row in rows)]
    print("  ".join(f"{c:>12}" for c in ("step", *columns)))
    for row in rows:
        cells = [f"{row['step']:>12}"] + [f"{row['metrics'].get(c, math.nan):>12.4g}" for c in columns]
        print("  ".join(cells))


def run_eval_all(cfg: PreftuneConfig, run_dir: str, json_path: str | None) -> int:
    """The CLI for ``--all-checkpoints``: evaluate (or go on evaluating), print the table, write JSON."""
    try:
        rows, results_path = evaluate_checkpoints(cfg, run_dir)
    except KeyboardInterrupt:
        print(
            f"\n[preftune] interrupted: the checkpoints evaluated so far are kept in {RunDir(run_dir).eval_checkpoints}; "
            "the same command goes on from there"
        )
        return EXIT_INTERRUPTED
    print(f"[preftune] validation metrics of {len(rows)} checkpoints of {run_dir} (kept in {results_path})")
    print_table(rows)
    if json_path:
        write_json(Path(json_path), {"run_dir": str(run_dir), "checkpoints": rows})
        print(f"[preftune] wrote {json_path}")
    return 0
