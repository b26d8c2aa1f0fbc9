"""``preftune eval``: the validation metrics of a checkpoint (full or LoRA), or of ``model.path`` itself,
computed exactly as training's validation computes them (same batches, micro-batches, layout and limit),
with the reference the config describes. One process."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from preftune.data.dataset import PreferenceDataset
from preftune.data.loading import load_datasets, load_validation
from preftune.errors import ConfigError
from preftune.modeling.model import DPOModel
from preftune.modeling.parallel import DistInfo
from preftune.run_dir import RunDir
from preftune.training.checkpoint import Checkpointer
from preftune.training.console import quiet_libraries
from preftune.training.loaders import build_dataloader, load_tokenizer, micro_batch_layout
from preftune.training.trainer import evaluate as evaluate_batches


def validation_set(cfg: DictConfig, tokenizer: Any) -> PreferenceDataset:
    """The validation pairs training would use: ``data.validation``, or the ``data.validation_fraction`` split."""
    cache_dir = RunDir(cfg.output_dir).tokenized(cfg.data.cache_dir)
    if cfg.data.validation:
        return load_validation(cfg.data, tokenizer, cache_dir)
    if cfg.data.validation_fraction is not None:
        return load_datasets(cfg.data, tokenizer, cache_dir)[1]
    raise ConfigError("no validation data: set data.validation=FILE (or data.validation_fraction)")


def evaluate(cfg: DictConfig, checkpoint: str | Path | None = None) -> dict[str, float]:
    """Pair-weighted validation metrics of ``checkpoint`` (``output_dir/checkpoints/step_N``), or of the
    base model when None, over (up to ``trainer.limit_val_batches`` of) the validation set."""
    quiet_libraries()
    if checkpoint is not None and not (Path(checkpoint) / "model").is_dir():
        raise ConfigError(
            f"--checkpoint {checkpoint}: not a checkpoint (expected output_dir/checkpoints/step_N)"
        )
    tokenizer = load_tokenizer(cfg)
    dataset: Any = validation_set(cfg, tokenizer)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = DPOModel.from_config(cfg)  # policy and reference from model.path
    if checkpoint is not None:
        Checkpointer.load_weights(Path(checkpoint), model.policy)
    model.to(device).train(False)
    dataset, collate = micro_batch_layout(cfg, dataset, model, tokenizer.eos_token_id, device)
    loader = build_dataloader(dataset, cfg, DistInfo(device=device), train=False)
    metrics, pairs = evaluate_batches(
        model, loader, lambda pairs: [(b, False) for b in collate(pairs)], cfg.trainer.limit_val_batches
    )
    return {**metrics, "pairs": pairs}


def run_eval(cfg: DictConfig, checkpoint: str | None, json_path: str | None) -> int:
    """The CLI: print a table of the metrics, optionally write them as JSON."""
    metrics = evaluate(cfg, checkpoint)
    what = checkpoint or f"{cfg.model.path} (base model)"
    print(f"[preftune] validation metrics of {what} on {metrics['pairs']} pairs")
    width = max(len(k) for k in metrics)
    for key, value in metrics.items():
        print(f"  {key:<{width}}  {value:.6g}" if isinstance(value, float) else f"  {key:<{width}}  {value}")
    if json_path:
        report = {"checkpoint": checkpoint, "model": cfg.model.path, "metrics": metrics}
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
        print(f"[preftune] wrote {json_path}")
    return 0
