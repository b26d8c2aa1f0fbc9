"""The DPO recipe: build everything from one config and train. Read it top to bottom."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoTokenizer

from preftune.config import PreftuneConfig, parse_max_time
from preftune.config_checks import absolute_paths, check_environment
from preftune.data.dataset import PreferenceDataset
from preftune.data.loading import load_datasets
from preftune.data.tokenize import tokenizer_fingerprint
from preftune.errors import ConfigError, DataError
from preftune.modeling.hub import local_model_dir
from preftune.modeling.layout_check import check_layout
from preftune.modeling.logprobs import causal_lm
from preftune.modeling.model import DPOModel
from preftune.modeling.parallel import DistInfo
from preftune.modeling.reference_cache import (
    precompute_reference,
    reference_model_fingerprint,
    with_cached_reference,
)
from preftune.run_dir import RunDir
from preftune.training.checkpoint import Checkpointer
from preftune.training.console import parameter_summary, quiet_libraries
from preftune.training.distributed import env_rank, init_distributed, main_rank_first
from preftune.training.judged import JudgedValidation, build_run_judge, prepare_judged_validation
from preftune.training.loaders import build_dataloader, load_tokenizer, micro_batch_layout
from preftune.training.metrics import MetricsLogger
from preftune.training.optim import build_optimizer, build_scheduler
from preftune.training.resume import finished_run, restart_schedule, saved_config, schedule_change
from preftune.training.retention import Retention
from preftune.training.run_lock import lock_output_dir
from preftune.training.samples import append_jsonl, greedy_generate, sample_rows, truncate_jsonl_after
from preftune.training.timer import RunTimer
from preftune.training.trackers import open_trackers
from preftune.training.trainer import DPOTrainer, resolve_max_steps


def log(message: str) -> None:
    """Print on rank 0 only."""
    if env_rank() == 0:
        print(f"[preftune] {message}", flush=True)


def check_same_tokenizer(tokenizer: Any, reference_path: str, trust_remote_code: bool) -> None:
    """``reference.path`` must tokenize exactly as ``model.path``: the reference scores the same token ids."""
    reference = AutoTokenizer.from_pretrained(reference_path, trust_remote_code=trust_remote_code)
    if tokenizer_fingerprint(reference) != tokenizer_fingerprint(tokenizer):
        raise ConfigError(
            f"reference.path={reference_path} has a different tokenizer than model.path: the reference must "
            "score the policy's token ids; use a reference trained with the same tokenizer"
        )


@dataclass(frozen=True)
class TrainResult:
    val_metrics: dict[str, float]  # the last validation's metrics ({} without validation data)
    finished: bool  # False: stopped early (a stop signal or trainer.max_time), to be resumed


def train(cfg: PreftuneConfig) -> dict[str, float]:
    """Train (or resume) the run described by ``cfg``; return the last validation metrics."""
    return run_training(cfg).val_metrics


def run_training(cfg: PreftuneConfig) -> TrainResult:
    """Train (or resume) the run described by ``cfg``, holding ``output_dir``'s lock throughout."""
    check_environment(cfg)  # before anything is loaded
    cfg = absolute_paths(cfg)
    info = init_distributed()
    quiet_libraries()
    output_dir = Path(cfg.output_dir)
    saved_cfg = saved_config(output_dir)  # the previous run's, before this one's replaces it
    if info.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
    lock = lock_output_dir(output_dir, info)  # one run per output_dir
    try:
        if info.is_main:
            OmegaConf.save(cfg, RunDir(output_dir).config)
        return _train_locked(cfg, info, saved_cfg)
    finally:
        lock.release()


def load_training_data(
    cfg: PreftuneConfig, info: DistInfo
) -> tuple[Any, PreferenceDataset, PreferenceDataset | None]:
    """The tokenizer and the tokenized train and validation sets: tokenized once (rank 0 first, the other
    ranks then read its cache)."""
    tokenizer = load_tokenizer(cfg)
    if cfg.reference.path is not None:
        check_same_tokenizer(tokenizer, cfg.reference.path, cfg.model.trust_remote_code)
    cache_dir = RunDir(cfg.output_dir).tokenized(cfg.data.cache_dir)
    with main_rank_first(info):  # however long rank 0 tokenizes, no collective times out
        train_set, val_set = load_datasets(cfg.data, tokenizer, cache_dir)
    for dataset in (train_set, val_set):
        if dataset is not None:
            log(dataset.load_summary())
    if len(train_set) < cfg.data.global_batch_size:
        raise DataError(
            f"the training set has {len(train_set)} pairs, fewer than one global batch "
            f"(data.global_batch_size={cfg.data.global_batch_size}): lower it or add data"
        )
    if val_set is None:
        log("no validation data (data.validation and data.validation_fraction are null): no val/ metrics")
    return tokenizer, train_set, val_set


def validation_generations(
    cfg: PreftuneConfig,
    model: DPOModel,
    tokenizer: Any,
    val_set: PreferenceDataset | None,
    logger: MetricsLogger,
    judged: JudgedValidation | None,
) -> Callable[[int], dict[str, float]] | None:
    """What the trainer calls at each validation (given the step): the policy's greedy generations for the
    first validation prompts, the first ``trainer.samples.num_prompts`` of them written as samples, the first
    ``trainer.judge_prompts`` judged against the reference's (returns their ``val/`` metrics); None when off."""
    num_samples = min(cfg.trainer.samples.num_prompts, len(val_set) if val_set is not None else 0)
    num_judged = len(judged.examples) if judged is not None else 0
    if max(num_samples, num_judged) == 0:
        return None
    prompts = [val_set[i]["prompt_ids"] for i in range(max(num_samples, num_judged))]
    run = RunDir(cfg.output_dir)

    def generate(step: int) -> dict[str, float]:  # every rank generates and judges; rank 0 writes
        generations = greedy_generate(
            causal_lm(model.policy),
            prompts,
            cfg.trainer.samples.max_new_tokens,
            tokenizer.eos_token_id,
            root=model.policy_logprobs,
        )
        if num_samples:
            examples = [val_set[i] for i in range(num_samples)]
            rows = sample_rows(tokenizer, examples, generations[:num_samples], step)
            if model.dist.is_main:
                append_jsonl(run.samples, rows)
                logger.send("log_samples", rows, step)
        if judged is None:
            return {}
        metrics, rows = judged(generations[:num_judged], tokenizer, step)
        if model.dist.is_main:
            append_jsonl(run.judged, rows)
        return metrics

    return generate


def check_packed_layout(cfg: PreftuneConfig, model: DPOModel, info: DistInfo) -> None:
    """Packed / shared-prompt runs: the real model's laid-out rows against separate forwards (a pass is cached
    in ``output_dir/cache/layout_check``)."""
    if not (cfg.data.packing or cfg.data.share_prompt):
        return
    cached = check_layout(
        model,
        pack=cfg.data.packing,
        share_prompt=cfg.data.share_prompt,
        model_path=local_model_dir(cfg.model.path),
        dtype=cfg.model.dtype,
        cache_dir=RunDir(cfg.output_dir).layout_check_cache if info.is_main else None,
    )
    log(f"layout self-check: {'passed before (cached)' if cached else 'passed'}")


def cache_reference(
    cfg: PreftuneConfig, model: DPOModel, train_set: Any, val_set: Any, collate: Callable
) -> tuple[Any, Any, Callable]:
    """``reference.mode: precompute``: one pass of the reference over train and validation, cached per (data,
    model) in ``output_dir/cache/reference`` (a resumed run loads them); the reference model is then freed.
    Returns the datasets and collate that carry the cached log-probs."""
    if cfg.reference.mode != "precompute" or model.loss.reference_free:
        return train_set, val_set, collate
    train_set, val_set = precompute_reference(
        model,
        [train_set, val_set],
        collate,
        RunDir(cfg.output_dir).reference_cache,
        model_fingerprint=reference_model_fingerprint(cfg.model, cfg.reference.path),
        batch_pairs=cfg.data.global_batch_size,
    )
    for cache in (c for c in (train_set, val_set) if c is not None):
        log(f"reference log-probs {'loaded from' if cache.from_cache else 'computed into'} {cache.path}")
    return train_set, val_set, with_cached_reference(collate)


def resume_training(
    trainer: DPOTrainer, checkpoint: Path, cfg: PreftuneConfig, saved_cfg: DictConfig | None
) -> None:
    """Restore the optimizer, scheduler, RNG and trainer state of ``checkpoint``; follow a changed schedule."""
    state = trainer.ckpt_callback.load_training_state(
        checkpoint, model=trainer.model, optimizer=trainer.optimizer, scheduler=trainer.scheduler
    )
    trainer.load_state_dict(state)
    log(f"resuming from {checkpoint} (step {state['step']}, {state['consumed_samples']} pairs consumed)")
    change = saved_cfg is not None and schedule_change(saved_cfg, cfg, trainer.step, trainer.steps_per_epoch)
    if change:
        restart_schedule(trainer.scheduler, cfg.optim.lr)
        log(change)


def start_line(cfg: PreftuneConfig, info: DistInfo, model: DPOModel, trainer: DPOTrainer) -> str:
    """``training for N steps of B pairs on WHERE (LAYOUT)`` (a resumed run: the steps left)."""
    where = (
        f"{info.world_size} x {info.device.type} ({cfg.distributed.strategy})"
        if info.distributed
        else info.device
    )
    layout = [
        name for name, on in (("packed", cfg.data.packing), ("shared prompt", cfg.data.share_prompt)) if on
    ]
    layout.append(f"{model.policy.config._attn_implementation} attention")
    steps = (
        f"{trainer.max_steps - trainer.step} steps left of {trainer.max_steps}"
        if trainer.step
        else f"{trainer.max_steps} steps"
    )
    return f"training for {steps} of {cfg.data.global_batch_size} pairs on {where} ({', '.join(layout)})"


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's generators from ``trainer.seed`` (a resume then restores their states)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def open_logs(cfg: PreftuneConfig, info: DistInfo, logger: MetricsLogger, resume_step: int | None) -> None:
    """``metrics.jsonl``, ``samples.jsonl`` and ``judged.jsonl`` cut back to the step resumed from (a fresh start, None: emptied),
    then the trackers opened at that step (a tracker that cannot start stops the run here, before training)."""
    keep = -1 if resume_step is None else resume_step
    logger.truncate_after(keep)
    if info.is_main:
        logger.attach(*open_trackers(cfg, Path(cfg.output_dir), resume_step))
        run = RunDir(cfg.output_dir)
        for path in (run.samples, run.judged):
            truncate_jsonl_after(path, keep)


def finish(trainer: DPOTrainer) -> TrainResult:
    """The run's end: said, and returned (``finished`` False: stopped early, to be resumed)."""
    finished = trainer.step >= trainer.max_steps
    if finished:
        log(f"done: metrics in {trainer.logger.path}, checkpoints in {trainer.ckpt_callback.root}")
    else:
        log(f"stopped early at step {trainer.step} of {trainer.max_steps}: the same command resumes it")
    return TrainResult(trainer.last_val_metrics, finished)


def _train_locked(cfg: PreftuneConfig, info: DistInfo, saved_cfg: DictConfig | None) -> TrainResult:
    timer = RunTimer(parse_max_time(cfg.trainer.max_time) if cfg.trainer.max_time else None)
    output_dir = Path(cfg.output_dir)
    seed_everything(cfg.trainer.seed)
    tokenizer, train_set, val_set = load_training_data(cfg, info)
    finished = finished_run(output_dir, cfg.trainer, len(train_set) // cfg.data.global_batch_size)
    if finished is not None:
        log(finished.message())
        return TrainResult(finished.val_metrics, finished=True)

    # Model: the policy and its reference (built before any checkpoint is restored; the reference's judged
    # generations are made then, or loaded), then the newest checkpoint's weights, then DDP/FSDP2, then the
    # reference's cached log-probs, then the optimizer.
    model = DPOModel.from_config(cfg).to(info.device)
    check_packed_layout(cfg, model, info)
    judge = build_run_judge(cfg, model, tokenizer) if cfg.trainer.judge_prompts > 0 else None
    judged = prepare_judged_validation(cfg, model, tokenizer, val_set, judge, write=info.is_main, log=log)
    train_set, collate = micro_batch_layout(cfg, train_set, model, tokenizer.eos_token_id, info.device)
    checkpointer = Checkpointer(output_dir, tokenizer, Retention.from_config(cfg.trainer))
    latest = checkpointer.resume_point(warn=log)
    if latest is not None:
        checkpointer.load_weights(latest, model.policy)
    model.distribute(cfg.distributed.strategy, info)
    train_set, val_set, collate = cache_reference(cfg, model, train_set, val_set, collate)
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

    # Resume from the newest complete checkpoint, then open the trackers at that step.
    if latest is not None:
        resume_training(trainer, latest, cfg, saved_cfg)
    open_logs(cfg, info, logger, trainer.step if latest is not None else None)
    trainer.on_validation = validation_generations(cfg, model, tokenizer, val_set, logger, judged)

    log(start_line(cfg, info, model, trainer))
    log(parameter_summary(model))
    try:
        trainer.fit()
    finally:
        logger.close()
    return finish(trainer)
