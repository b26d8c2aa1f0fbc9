"""``preftune eval``: the validation metrics of a checkpoint (full or LoRA), or of ``model.path`` itself,
computed exactly as training's validation computes them (same batches, micro-batches, layout and limit),
with the reference the config describes. One process."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from transformers import AutoTokenizer

from preftune.config import ConfigError
from preftune.data.batch import padded_micro_batches
from preftune.data.chat import load_chat_template
from preftune.data.dataset import PreferenceDataset, dataset_options, load_datasets
from preftune.data.packing import DPOPackedDataset
from preftune.data.sampler import GlobalBatchSampler
from preftune.modeling.model import DPOModel
from preftune.training.checkpoint import Checkpointer
from preftune.training.console import quiet_libraries
from preftune.training.trainer import MetricsAccumulator, limit_batches


def validation_set(cfg: DictConfig, tokenizer: Any) -> PreferenceDataset:
    data = cfg.data
    cache_dir = data.cache_dir or Path(cfg.output_dir) / "cache" / "tokenized"
    if data.validation:
        options = dataset_options(data)
        return PreferenceDataset(data.validation, tokenizer, data.max_seq_length, cache_dir, **options)
    if data.validation_fraction is not None:
        return load_datasets(data, tokenizer, cache_dir)[1]
    raise ConfigError("no validation data: set data.validation=FILE (or data.validation_fraction)")


@torch.no_grad()
def evaluate(cfg: DictConfig, checkpoint: str | Path | None = None) -> dict[str, float]:
    """Pair-weighted validation metrics of ``checkpoint`` (``output_dir/checkpoints/step_N``), or of the
    base model when None, over (up to ``trainer.limit_val_batches`` of) the validation set."""
    quiet_libraries()
    if checkpoint is not None and not (Path(checkpoint) / "model").is_dir():
        raise ConfigError(
            f"--checkpoint {checkpoint}: not a checkpoint (expected output_dir/checkpoints/step_N)"
        )
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    if cfg.data.chat_template:
        tokenizer.chat_template = load_chat_template(cfg.data.chat_template)
    dataset: Any = validation_set(cfg, tokenizer)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = DPOModel.from_config(cfg)  # policy and reference from model.path
    if checkpoint is not None:
        Checkpointer.load_weights(Path(checkpoint), model.policy)
    model.to(device).train(False)
    if cfg.data.packing or cfg.data.share_prompt:
        dataset = DPOPackedDataset(
            dataset,
            model.policy.config,
            eos_id=tokenizer.eos_token_id,
            pack_length=cfg.data.pack_length or 2 * cfg.data.max_seq_length,
            pack=cfg.data.packing,
            share_prompt=cfg.data.share_prompt,
            rows_per_micro_batch=cfg.data.micro_batch_size,
            device=device,
        )
        collate = dataset.global_collate_fn
    else:
        collate = partial(
            padded_micro_batches, micro_batch_size=cfg.data.micro_batch_size, eos_id=tokenizer.eos_token_id
        )
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
            accumulator.add(metrics, len(batch["chosen_rewards"]))
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
