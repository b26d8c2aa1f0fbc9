"""The DPO recipe: build everything from one config and train. Read it top to bottom."""

from __future__ import annotations

import random
from functools import partial
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from transformers import AutoTokenizer

from preftune.checkpoint import Checkpointer
from preftune.config import parse_max_time
from preftune.data import GlobalBatchSampler, PreferenceDataset, padded_micro_batches
from preftune.metrics import MetricsLogger
from preftune.model import DPOModel
from preftune.optim import build_optimizer, build_scheduler
from preftune.timer import RunTimer
from preftune.trainer import DPOTrainer, resolve_max_steps


def log(message: str) -> None:
    print(f"[preftune] {message}", flush=True)


def build_dataloader(dataset: PreferenceDataset, cfg: DictConfig, *, train: bool) -> DataLoader:
    """Batches are this rank's share of a global batch, as lists of tokenized pairs."""
    sampler = GlobalBatchSampler(
        len(dataset), cfg.data.global_batch_size, seed=cfg.data.seed, shuffle=train, drop_last=train
    )
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=list, num_workers=cfg.data.num_workers)


def train(cfg: DictConfig) -> dict[str, float]:
    """Train (or resume) the run described by ``cfg``; return the last validation metrics."""
    timer = RunTimer(parse_max_time(cfg.trainer.max_time) if cfg.trainer.max_time else None)
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, output_dir / "config.yaml")
    random.seed(cfg.trainer.seed)
    np.random.seed(cfg.trainer.seed)
    torch.manual_seed(cfg.trainer.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    # Data: tokenized once, cached on disk.
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    cache_dir = cfg.data.cache_dir or output_dir / "cache" / "tokenized"
    train_set = PreferenceDataset(cfg.data.train, tokenizer, cfg.data.max_seq_length, cache_dir)
    log(train_set.stats.summary() + (" (from cache)" if train_set.from_cache else ""))
    val_set = None
    if cfg.data.validation:
        val_set = PreferenceDataset(cfg.data.validation, tokenizer, cfg.data.max_seq_length, cache_dir)
        log(val_set.stats.summary() + (" (from cache)" if val_set.from_cache else ""))
    train_loader = build_dataloader(train_set, cfg, train=True)
    val_loader = build_dataloader(val_set, cfg, train=False) if val_set is not None else None
    collate = partial(
        padded_micro_batches, micro_batch_size=cfg.data.micro_batch_size, eos_id=tokenizer.eos_token_id
    )

    # Model: the policy and its reference, both from model.path (before any checkpoint is restored).
    model = DPOModel.from_config(cfg).to(device)
    optimizer = build_optimizer(model.policy, cfg.optim)
    max_steps = resolve_max_steps(cfg.trainer, train_loader.batch_sampler.batches_per_epoch)
    scheduler = build_scheduler(optimizer, cfg.optim, max_steps)

    checkpointer = Checkpointer(output_dir, tokenizer)
    logger = MetricsLogger(output_dir)
    trainer = DPOTrainer(
        cfg=cfg,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        train_dataloader=train_loader,
        val_dataloader=val_loader,
        test_dataloader=None,
        collate_fn=collate,
        logger=logger,
        ckpt_callback=checkpointer,
        run_timer=timer,
    )

    # Resume from the newest complete checkpoint in output_dir, if any.
    latest = checkpointer.latest()
    if latest is not None:
        state = checkpointer.load(latest, policy=model.policy, optimizer=optimizer, scheduler=scheduler)
        trainer.load_state_dict(state)
        log(f"resuming from {latest} (step {state['step']}, {state['consumed_samples']} pairs consumed)")
    logger.truncate_after(trainer.step)

    log(f"training for {trainer.max_steps} steps of {cfg.data.global_batch_size} pairs on {device}")
    trainer.fit()
    log(f"done: metrics in {logger.path}, checkpoints in {checkpointer.root}")
    return trainer.last_val_metrics
