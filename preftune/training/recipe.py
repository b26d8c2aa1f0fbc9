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

from preftune.config import ConfigError, parse_max_time
from preftune.data.batch import padded_micro_batches
from preftune.data.chat import load_chat_template
from preftune.data.dataset import PreferenceDataset, load_datasets
from preftune.data.packing import DPOPackedDataset
from preftune.data.sampler import GlobalBatchSampler
from preftune.modeling.model import DPOModel
from preftune.modeling.reference_cache import (
    ReferenceCache,
    model_fingerprint,
    precompute_reference,
    with_cached_reference,
)
from preftune.training.checkpoint import Checkpointer
from preftune.training.distributed import DistInfo, env_rank, init_distributed, main_rank_first
from preftune.training.metrics import MetricsLogger
from preftune.training.optim import build_optimizer, build_scheduler
from preftune.training.timer import RunTimer
from preftune.training.trainer import DPOTrainer, resolve_max_steps


def log(message: str) -> None:
    """Print on rank 0 only."""
    if env_rank() == 0:
        print(f"[preftune] {message}", flush=True)


def build_dataloader(
    dataset: PreferenceDataset | ReferenceCache, cfg: DictConfig, info: DistInfo, *, train: bool
) -> DataLoader:
    """Batches are this rank's share of a global batch, as lists of tokenized pairs."""
    sampler = GlobalBatchSampler(
        len(dataset),
        cfg.data.global_batch_size,
        seed=cfg.data.seed,
        shuffle=train,
        drop_last=train,
        rank=info.rank,
        world_size=info.world_size,
    )
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=list, num_workers=cfg.data.num_workers)


def train(cfg: DictConfig) -> dict[str, float]:
    """Train (or resume) the run described by ``cfg``; return the last validation metrics."""
    info = init_distributed()
    # Each rank takes an equal share of the pairs; unpacked, in whole micro-batches (packing counts rows).
    mbs, world = cfg.data.micro_batch_size, info.world_size
    unit, why = (
        (world, "the number of ranks")
        if cfg.data.packing
        else (mbs * world, f"micro-batch {mbs} x {world} ranks")
    )
    if cfg.data.global_batch_size % unit:
        raise ConfigError(
            f"data.global_batch_size ({cfg.data.global_batch_size}) must be a multiple of {unit} ({why})"
        )
    timer = RunTimer(parse_max_time(cfg.trainer.max_time) if cfg.trainer.max_time else None)
    output_dir = Path(cfg.output_dir)
    if info.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, output_dir / "config.yaml")
    random.seed(cfg.trainer.seed)
    np.random.seed(cfg.trainer.seed)
    torch.manual_seed(cfg.trainer.seed)

    # Data: tokenized once (rank 0 first, the other ranks then read its cache).
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    if cfg.data.chat_template:  # checkpoints then carry the template the model was trained with
        tokenizer.chat_template = load_chat_template(cfg.data.chat_template)
    cache_dir = cfg.data.cache_dir or output_dir / "cache" / "tokenized"
    with main_rank_first(info):  # however long rank 0 tokenizes, no collective times out
        train_set, val_set = load_datasets(cfg.data, tokenizer, cache_dir)
    for dataset in (train_set, val_set):
        if dataset is not None:
            log(dataset.load_summary())

    # Model: the policy and its reference, both from model.path (the reference before any checkpoint is
    # restored), then the newest checkpoint's weights, then DDP/FSDP2, then the optimizer.
    model = DPOModel.from_config(cfg).to(info.device)
    if cfg.data.packing or cfg.data.share_prompt:  # several pairs per row and/or one prompt per pair
        train_set = DPOPackedDataset(
            train_set,
            model.policy.config,
            eos_id=tokenizer.eos_token_id,
            pack_length=cfg.data.pack_length or 2 * cfg.data.max_seq_length,
            pack=cfg.data.packing,
            share_prompt=cfg.data.share_prompt,
            rows_per_micro_batch=cfg.data.micro_batch_size,
            device=info.device,
        )
        collate = train_set.global_collate_fn  # validation batches are packed by the same collate
    else:
        collate = partial(
            padded_micro_batches, micro_batch_size=cfg.data.micro_batch_size, eos_id=tokenizer.eos_token_id
        )
    checkpointer = Checkpointer(output_dir, tokenizer)
    latest = checkpointer.latest()
    if latest is not None:
        checkpointer.load_weights(latest, model.policy)
    model.distribute(cfg.distributed.strategy, info)

    # Reference log-probs: one pass of the reference over train and validation, cached per (data, model) in
    # output_dir/cache/reference (a resumed run loads them); the reference model is then freed.
    if cfg.reference.mode == "precompute" and not model.reference_free:
        train_set, val_set = precompute_reference(
            model,
            [train_set, val_set],
            collate,
            output_dir / "cache" / "reference",
            model_fingerprint=model_fingerprint(cfg.model.path, cfg.model.dtype),
            batch_pairs=cfg.data.global_batch_size,
        )
        for cache in (c for c in (train_set, val_set) if c is not None):
            log(f"reference log-probs {'loaded from' if cache.from_cache else 'computed into'} {cache.path}")
        collate = with_cached_reference(collate)
    train_loader = build_dataloader(train_set, cfg, info, train=True)
    val_loader = build_dataloader(val_set, cfg, info, train=False) if val_set is not None else None
    optimizer = build_optimizer(model.policy, cfg.optim)
    max_steps = resolve_max_steps(cfg.trainer, train_loader.batch_sampler.batches_per_epoch)
    scheduler = build_scheduler(optimizer, cfg.optim, max_steps)
    logger = MetricsLogger(output_dir, enabled=info.is_main)
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
    if latest is not None:
        state = checkpointer.load_training_state(
            latest, model=model, optimizer=optimizer, scheduler=scheduler
        )
        trainer.load_state_dict(state)
        log(f"resuming from {latest} (step {state['step']}, {state['consumed_samples']} pairs consumed)")
    logger.truncate_after(trainer.step)

    where = (
        f"{info.world_size} x {info.device.type} ({cfg.distributed.strategy})"
        if info.distributed
        else info.device
    )
    layout = [
        name for name, on in (("packed", cfg.data.packing), ("shared prompt", cfg.data.share_prompt)) if on
    ]
    layout.append(f"{model.policy.config._attn_implementation} attention")
    log(
        f"training for {trainer.max_steps} steps of {cfg.data.global_batch_size} pairs on {where} "
        f"({', '.join(layout)})"
    )
    trainer.fit()
    log(f"done: metrics in {logger.path}, checkpoints in {checkpointer.root}")
    return trainer.last_val_metrics
