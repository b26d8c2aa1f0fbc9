"""``preftune eval``: the validation metrics of a checkpoint (full or LoRA), or of ``model.path`` itself,
computed exactly as training's validation computes them (same batches, micro-batches, layout and limit),
with the reference the config describes. One process."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from preftune.config import ConfigError
from preftune.config_checks import check_environment
from preftune.data.dataset import PreferenceDataset, load_datasets, load_validation
from preftune.data.sampler import GlobalBatchSampler
from preftune.modeling.model import DPOModel
from preftune.training.checkpoint import Checkpointer
from preftune.training.console import quiet_libraries
from preftune.training.recipe import load_tokenizer, micro_batch_layout
from preftune.training.trainer import MetricsAccumulator, limit_batches


def validation_set(cfg: DictConfig, tokenizer: Any) -> PreferenceDataset:
    """The validation pairs training would use: ``data.validation``, or the ``data.validation_fraction`` split."""
    cache_dir = cfg.data.cache_dir or Path(cfg.output_dir) / "cache" / "tokenized"
    if cfg.data.validation:
        return load_validation(cfg.data, tokenizer, cache_dir)
    if cfg.data.validation_fraction is not None:
        return load_datasets(cfg.data, tokenizer, cache_dir)[1]
    raise ConfigError("no validation data: set data.validation=FILE (or data.validation_fraction)")


@torch.no_grad()
def evaluate(cfg: DictConfig, checkpoint: str | Path | None = None) -> dict[str, float]:
    """Pair-weighted validation metrics of ``checkpoint`` (``output_dir/checkpoints/step_N``), or of the
    base model when None, over (up to ``trainer.limit_val_batches`` of) the validation set."""
    quiet_libraries()
    check_environment(cfg)
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
    sampler = GlobalBatchSampler(
        len(dataset), cfg.data.global_batch_size, seed=cfg.data.seed, shuffle=False, drop_last=False
    )
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=list)
    accumulator = MetricsAccumulator()
    num_batches = limit_batches(cfg.trainer.limit_val_batches, len(loader))
    for i, global_batch in enumerate(loader):
        if i >= num_batches:
            break
        for batch in collate(global_batch):
            _, metrics = model.get_loss_and_metrics(batch, forward_only=True)
            accumulator.add(metrics, batch.num_pairs)
    means, pairs, _ = accumulator.reduce(model.dist)
    return {**means, "pairs": pairs}


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
