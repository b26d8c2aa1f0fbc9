"""The DPO recipe: build everything from one config and train. Read it top to bottom."""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from transformers import AutoTokenizer

from preftune.config import ColumnsConfig, PreftuneConfig, parse_max_time
from preftune.config_checks import absolute_paths, check_environment
from preftune.data.batch import MicroBatch
from preftune.data.dataset import PreferenceDataset
from preftune.data.loading import load_datasets, load_validation
from preftune.data.packing import group_by_prompt
from preftune.data.prompts import PromptSet, load_prompts
from preftune.data.tokenize import tokenizer_fingerprint
from preftune.errors import ConfigError, DataError
from preftune.modeling.generation import HFGenerator
from preftune.modeling.hub import local_model_dir
from preftune.modeling.judges import build_judge, judge_is_set
from preftune.modeling.layout_check import check_layout
from preftune.modeling.logprobs import causal_lm
from preftune.modeling.model import DTYPES, DPOModel, load_causal_lm
from preftune.modeling.parallel import DistInfo
from preftune.modeling.rank0_load import loads_from_rank0
from preftune.modeling.reference_cache import (
    ReferenceCache,
    precompute_reference,
    reference_model_fingerprint,
    with_cached_reference,
)
from preftune.run_dir import RunDir
from preftune.tools.export import export_checkpoint
from preftune.training.checkpoint import Checkpointer
from preftune.training.console import parameter_summary, quiet_libraries
from preftune.training.distributed import init_distributed, main_rank_first
from preftune.training.iteration import generate_iteration, iteration_prompts, write_generations, write_pairs
from preftune.training.judged import JudgedValidation, build_run_judge, prepare_judged_validation
from preftune.training.launcher import env_rank
from preftune.training.loaders import build_dataloader, load_tokenizer, micro_batch_layout, pack_length
from preftune.training.metrics import MetricsLogger
from preftune.training.online import OnlineSettings, OnlineStep
from preftune.training.optim import build_optimizer, build_scheduler
from preftune.training.progress import run_length
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
    finished: bool  # False: stopped early (a stop signal, trainer.max_time or should_stop), to be resumed
    steps: int = 0  # the optimizer steps the run has made (a resumed run: in all)
    tokenized: bool = False  # this call tokenized data (False: every set came from the tokenization cache)
    reference_computed: bool = False  # this call ran the reference pass of reference.mode=precompute
    stopped_by_callback: bool = False  # should_stop stopped it


def train(cfg: PreftuneConfig) -> dict[str, float]:
    """Train (or resume) the run described by ``cfg``; return the last validation metrics."""
    return run_training(cfg).val_metrics


def run_training(
    cfg: PreftuneConfig, should_stop: Callable[[int, dict[str, float]], bool] | None = None
) -> TrainResult:
    """Train (or resume) the run described by ``cfg``, holding ``output_dir``'s lock throughout.
    ``should_stop(step, val_metrics)``, asked after each validation during training, stops it when True."""
    if cfg.online.enabled and cfg.online.iterations:
        return run_iterations(cfg)
    check_environment(cfg)  # before anything is loaded
    cfg = absolute_paths(cfg)
    info = init_distributed(cfg.distributed.tensor_parallel, cfg.distributed.context_parallel)
    quiet_libraries()
    output_dir = Path(cfg.output_dir)
    saved_cfg = saved_config(output_dir)  # the previous run's, before this one's replaces it
    if info.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
    lock = lock_output_dir(output_dir, info)  # one run per output_dir
    try:
        if info.is_main:
            OmegaConf.save(cfg, RunDir(output_dir).config)
        return _train_locked(cfg, info, saved_cfg, should_stop)
    finally:
        lock.release()


def run_iterations(cfg: PreftuneConfig) -> TrainResult:
    """Iterative DPO (``online.iterations``): per iteration, the policy generates for the iteration's prompts,
    the judge scores, the pairs go to ``iterations/NNN/pairs.jsonl``, and the ordinary offline recipe trains on
    them in ``iterations/NNN/train`` from the policy (model.path), against the starting model or the
    iteration's own starting policy (``online.reference``); its final checkpoint becomes
    ``iterations/NNN/policy``, the next iteration's policy. Every phase is kept once done, so the same command
    resumes a killed run where it stopped, inside a generation included."""
    check_environment(cfg)
    cfg = absolute_paths(cfg)
    info = init_distributed()
    quiet_libraries()
    if info.distributed:
        raise ConfigError("online.iterations runs on one process for now: start it without torchrun")
    run = RunDir(cfg.output_dir)
    run.root.mkdir(parents=True, exist_ok=True)
    lock = lock_output_dir(run.root, info)
    logger = MetricsLogger(run.root)  # iteration/ metrics, one record per iteration
    try:
        OmegaConf.save(cfg, run.config)
        tokenizer = load_tokenizer(cfg)
        prompts = load_prompts(
            cfg.data,
            tokenizer,
            run.tokenized(cfg.data.cache_dir),
            cfg.data.max_seq_length - cfg.online.max_new_tokens,
        )
        log(prompts.load_summary())
        policy, records, result = cfg.model.path, [], TrainResult({}, finished=True)
        logger.truncate_after(0)  # rewritten below from every iteration's chunks
        for n in range(1, cfg.online.iterations + 1):
            directory = run.iteration(n)
            indices = iteration_prompts(len(prompts), cfg.online.prompts_per_iteration, cfg.data.seed, n)
            generated = generate_iteration(
                partial(iteration_step, cfg, policy, tokenizer, prompts, info),
                prompts,
                indices,
                n,
                directory,
                chunk_size=cfg.data.global_batch_size,
                log=log,
            )
            records += generated.records
            write_generations(run.generations, records)
            logger.log_metrics(generated.metrics, n, prefix="iteration")
            pairs = write_pairs(directory, generated.pairs)
            log(f"iteration {n}: {len(generated.pairs)} pairs from {len(indices)} prompts: {pairs}")
            if len(generated.pairs) < cfg.data.global_batch_size:
                log(
                    f"iteration {n}: fewer pairs than a global batch: not trained on (the policy carries over)"
                )
                continue
            result = run_training(iteration_config(cfg, n, policy, pairs))
            if not result.finished:
                return result
            policy = str(export_policy(directory))
        log(f"done: {cfg.online.iterations} iterations; the last policy is {policy}")
        return result
    finally:
        logger.close()
        lock.release()


def iteration_step(
    cfg: PreftuneConfig, policy: str, tokenizer: Any, prompts: PromptSet, info: DistInfo
) -> OnlineStep:
    """An iteration's generator and judge: ``policy`` (the starting model or the previous iteration's result)
    sampling as ``online.*`` says."""
    model_cfg = OmegaConf.merge(cfg.model, {"path": policy, "lora": {"r": 0, "init_from": None}})
    lm = load_causal_lm(model_cfg, None).to(info.device)
    return online_step(cfg, lm, tokenizer, prompts, info, output_dir=None)


def iteration_config(cfg: PreftuneConfig, n: int, policy: str, pairs: Path) -> PreftuneConfig:
    """The offline run of iteration ``n``: ``pairs`` from ``policy``, in ``iterations/NNN/train``; its
    reference the starting model (``online.reference: initial``) or ``policy`` itself (``previous``: a null
    reference.path is a frozen copy of the policy as it starts)."""
    reference = cfg.reference.path  # iteration 1: the starting model either way
    if n > 1:
        reference = None if cfg.online.reference == "previous" else reference or cfg.model.path
    return OmegaConf.merge(
        cfg,
        {
            "output_dir": str(RunDir(cfg.output_dir).iteration(n) / "train"),
            "model": {"path": policy},
            "reference": {"path": reference},
            "online": {"enabled": False, "iterations": None},
            # auto: the pairs file is detected as tokenized, data.validation as whatever format it is in
            "data": {"train": str(pairs), "format": "auto", "columns": ColumnsConfig()},
        },
    )


def export_policy(directory: Path) -> Path:
    """The iteration's trained policy as a model directory (LoRA merged), ``directory/policy`` (written under
    a temporary name, then renamed)."""
    policy = directory / "policy"
    if not policy.is_dir():
        tmp = directory / ".policy.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        export_checkpoint(Checkpointer(directory / "train").latest(), tmp, merge=True)
        tmp.rename(policy)
    return policy


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


def load_online_data(cfg: PreftuneConfig, info: DistInfo) -> tuple[Any, PromptSet, PreferenceDataset | None]:
    """Online: the tokenizer, the prompts of ``data.train`` (cut to leave ``online.max_new_tokens`` of
    ``data.max_seq_length``) and the ``data.validation`` pairs."""
    tokenizer = load_tokenizer(cfg)
    if cfg.reference.path is not None:
        check_same_tokenizer(tokenizer, cfg.reference.path, cfg.model.trust_remote_code)
    cache_dir = RunDir(cfg.output_dir).tokenized(cfg.data.cache_dir)
    max_prompt_length = cfg.data.max_seq_length - cfg.online.max_new_tokens
    with main_rank_first(info):
        prompts = load_prompts(cfg.data, tokenizer, cache_dir, max_prompt_length)
        val_set = load_validation(cfg.data, tokenizer, cache_dir) if cfg.data.validation else None
    log(prompts.load_summary())
    if len(prompts) < cfg.data.global_batch_size:
        raise DataError(
            f"data.train has {len(prompts)} distinct prompts, fewer than one global batch "
            f"(data.global_batch_size={cfg.data.global_batch_size} prompts online): lower it or add prompts"
        )
    if cfg.online.pairing == "spin" and prompts.chosen is None:
        raise DataError(
            "online.pairing=spin trains towards the data's responses, and data.train holds prompts only: "
            "give preference pairs (their chosen responses are used) or pick another pairing"
        )
    return tokenizer, prompts, val_set


def online_step(
    cfg: PreftuneConfig,
    policy: nn.Module,
    tokenizer: Any,
    prompts: PromptSet,
    info: DistInfo,
    *,
    root: nn.Module | None = None,
    output_dir: Path | None,
) -> OnlineStep:
    """What turns each global batch of prompts into pairs: the policy's sampler and the judge (after
    ``model.distribute``: under FSDP2 the sampler gathers the sharded ``root``); its lines go to
    ``output_dir``'s generations.jsonl (None: kept by the caller)."""
    settings = OnlineSettings.from_config(cfg.online)
    judge = None
    if judge_is_set(cfg.judge):
        judge = build_judge(
            cfg.judge,
            dtype=DTYPES[cfg.model.dtype],
            device=info.device,
            policy=causal_lm(policy),
            policy_tokenizer=tokenizer,
        )
        log(f"judge: {judge.description}")
    generator = HFGenerator(
        policy,
        settings.sampling,
        stop_ids=prompts.stop_ids,
        pad_id=tokenizer.eos_token_id,
        root=root,
        dist=info,
    )
    return OnlineStep(
        settings, generator, judge, tokenizer, data_seed=cfg.data.seed, dist=info, output_dir=output_dir
    )


def online_filler_pair(prompt: dict, eos_id: int) -> dict:
    """A pair for a rank with none to run on while others train (it counts for nothing)."""
    return {
        "prompt_ids": prompt["prompt_ids"],
        "chosen_ids": [eos_id],
        "rejected_ids": [eos_id],
        "chosen_reward": 0.0,
        "rejected_reward": 0.0,
        "index": -1,
        "ref_logps": (0.0, 0.0),
    }


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


def distributed_model(cfg: PreftuneConfig, info: DistInfo) -> DPOModel:
    """The policy and its reference on this rank's device, wrapped or sharded (``DPOModel.distribute``). FSDP2
    over several ranks: rank 0 reads the weights into CPU memory, the other ranks build the model on the meta
    device, and each receives its shards from rank 0 (``preftune.modeling.rank0_load``)."""
    from_rank0 = loads_from_rank0(cfg.distributed.strategy, cfg.model.load_in_4bit, info)
    model = DPOModel.from_config(cfg, meta=from_rank0 and not info.is_main, shared_copy=from_rank0)
    if not from_rank0:
        model.to(info.device)
    model.distribute(cfg.distributed.strategy, info, from_rank0=from_rank0)
    return model


def check_packed_layout(cfg: PreftuneConfig, model: DPOModel) -> None:
    """Packed / shared-prompt runs: the real model's laid-out rows against separate forwards (a pass is cached
    in ``output_dir/cache/layout_check``). After ``distribute``: every rank runs it (or skips it) together."""
    if not (cfg.data.packing or cfg.data.share_prompt):
        return
    cached = check_layout(
        model,
        pack=cfg.data.packing,
        share_prompt=cfg.data.share_prompt,
        model_path=local_model_dir(cfg.model.path),
        dtype=cfg.model.dtype,
        cache_dir=RunDir(cfg.output_dir).layout_check_cache,
    )
    log(f"layout self-check: {'passed before (cached)' if cached else 'passed'}")


def cache_reference(
    cfg: PreftuneConfig, model: DPOModel, train_set: Any, val_set: Any, collate: Callable
) -> tuple[Any, Any, Callable]:
    """``reference.mode: precompute``: one pass of the reference over train and validation, cached per (data,
    model) in ``reference.cache_dir`` (null: ``output_dir/cache/reference``; a resumed run loads them); the
    reference model is then freed.
    Returns the datasets and collate that carry the cached log-probs."""
    if cfg.reference.mode != "precompute" or model.loss.reference_free:
        return train_set, val_set, collate
    train_set, val_set = precompute_reference(
        model,
        [train_set, val_set],
        collate,
        RunDir(cfg.output_dir).reference_cache(cfg.reference.cache_dir),
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
    """``training for N steps: WHICH LIMIT ENDS THE RUN; B pairs a step on WHERE (LAYOUT)`` (a resumed run:
    the steps left first)."""
    where = f"{info.world_size} x {info.device.type} ({cfg.distributed.strategy}{mesh_words(info)})"
    where = where if info.distributed else info.device
    layout = [
        name for name, on in (("packed", cfg.data.packing), ("shared prompt", cfg.data.share_prompt)) if on
    ]
    layout.append(f"{model.policy.config._attn_implementation} attention")
    length = run_length(cfg.trainer.max_epochs, cfg.trainer.max_steps, trainer.steps_per_epoch)
    left = f"{trainer.max_steps - trainer.step} steps left of " if trainer.step else ""
    batch = (
        f"{cfg.data.global_batch_size} prompts x {cfg.online.num_generations} samples (online)"
        if cfg.online.enabled
        else f"{cfg.data.global_batch_size} pairs"
    )
    return (
        f"training for {left}{length.sentence(trainer.sampler.num_samples)}; "
        f"{batch} a step on {where} ({', '.join(layout)})"
    )


def mesh_words(info: DistInfo) -> str:
    """``, mesh dp 2 x cp 1 x tp 2`` when tensor or context parallelism is on, else nothing."""
    if info.mesh is None:
        return ""
    return f", mesh dp {info.data_parallel} x cp {info.context_parallel} x tp {info.tensor_parallel}"


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's generators from ``trainer.seed`` (a resume then restores their states)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def open_logs(cfg: PreftuneConfig, info: DistInfo, logger: MetricsLogger, resume_step: int | None) -> None:
    """``metrics.jsonl``, ``samples.jsonl``, ``judged.jsonl`` and ``generations.jsonl`` cut back to the step
    resumed from (a fresh start, None: emptied), then the trackers opened at that step (a tracker that cannot
    start stops the run here, before training)."""
    keep = -1 if resume_step is None else resume_step
    logger.truncate_after(keep)
    if info.is_main:
        logger.attach(*open_trackers(cfg, Path(cfg.output_dir), resume_step))
        run = RunDir(cfg.output_dir)
        for path in (run.samples, run.judged, run.generations):
            truncate_jsonl_after(path, keep)


def finish(trainer: DPOTrainer, *, tokenized: bool, reference_computed: bool) -> TrainResult:
    """The run's end: said, and returned (``finished`` False: stopped early, to be resumed, unless
    ``should_stop`` stopped it)."""
    finished = trainer.step >= trainer.max_steps
    root = trainer.ckpt_callback.root
    if finished:
        log(f"done: metrics in {trainer.logger.path}, checkpoints in {root}")
    elif trainer.stopped_by_callback:
        log(f"stopped at step {trainer.step} of {trainer.max_steps} by should_stop; saved in {root}")
    else:
        log(f"stopped early at step {trainer.step} of {trainer.max_steps}: the same command resumes it")
    return TrainResult(
        trainer.last_val_metrics,
        finished,
        steps=trainer.step,
        tokenized=tokenized,
        reference_computed=reference_computed,
        stopped_by_callback=trainer.stopped_by_callback,
    )


def build_trainer(
    cfg: PreftuneConfig,
    info: DistInfo,
    model: DPOModel,
    data: tuple[Any, Any, Callable[[Sequence[dict]], list[MicroBatch]]],
    checkpointer: Checkpointer,
    timer: RunTimer,
) -> DPOTrainer:
    """The data loaders, optimizer, schedule and metrics log around ``model``, as one ``DPOTrainer``;
    ``data`` is (train set, validation set or None, the micro-batch collate)."""
    train_set, val_set, collate = data
    train_loader = build_dataloader(train_set, cfg, info, train=True)
    val_loader = build_dataloader(val_set, cfg, info, train=False) if val_set is not None else None
    optimizer = build_optimizer(model.policy, cfg.optim)
    max_steps = resolve_max_steps(cfg.trainer, train_loader.batch_sampler.batches_per_epoch)
    return DPOTrainer(
        cfg=cfg,
        model=model,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, cfg.optim, max_steps),
        train_dataloader=train_loader,
        val_dataloader=val_loader,
        test_dataloader=None,
        collate_fn=collate,
        logger=MetricsLogger(Path(cfg.output_dir), enabled=info.is_main),
        ckpt_callback=checkpointer,
        run_timer=timer,
    )


def attach_online(
    trainer: DPOTrainer, cfg: PreftuneConfig, tokenizer: Any, prompts: PromptSet, info: DistInfo
) -> None:
    """Online DPO: the trainer's batches are prompts, made into pairs each step. The reference scores each
    completion once: padded, before the step (the step's pairs carry its log-probs); packed / shared prompt, in
    the step, on K-completion groups (each completion laid out once)."""
    model, collate = trainer.model, trainer.collate_fn
    grouped = cfg.data.packing or cfg.data.share_prompt
    trainer.online = online_step(
        cfg,
        model.policy,
        tokenizer,
        prompts,
        info,
        root=model.policy_logprobs,
        output_dir=Path(cfg.output_dir),
    )
    trainer.reference_collate = None if model.loss.reference_free or grouped else collate
    trainer.online_collate = collate if trainer.reference_collate is None else with_cached_reference(collate)
    if grouped:
        trainer.group_pairs = partial(
            group_by_prompt, max_tokens=pack_length(cfg), share_prompt=cfg.data.share_prompt
        )
    trainer.filler_pair = online_filler_pair(prompts[0], tokenizer.eos_token_id)


def _train_locked(
    cfg: PreftuneConfig,
    info: DistInfo,
    saved_cfg: DictConfig | None,
    should_stop: Callable[[int, dict[str, float]], bool] | None,
) -> TrainResult:
    timer = RunTimer(parse_max_time(cfg.trainer.max_time) if cfg.trainer.max_time else None)
    output_dir = Path(cfg.output_dir)
    seed_everything(cfg.trainer.seed)
    online = cfg.online.enabled
    load = load_online_data if online else load_training_data
    tokenizer, train_set, val_set = load(cfg, info)
    prompts = train_set if online else None
    datasets = (val_set,) if online else (train_set, val_set)  # online prompts are not a tokenization cache
    tokenized = not all(d.from_cache for d in datasets if d is not None)
    finished = finished_run(output_dir, cfg.trainer, len(train_set) // cfg.data.global_batch_size)
    if finished is not None:
        log(finished.message())
        return TrainResult(finished.val_metrics, finished=True, steps=finished.step, tokenized=tokenized)

    # Model: the policy and its reference, DDP / FSDP2, the self-check of the layout and the reference's
    # judged generations (after distribute: every rank joins those forwards, each holding its shards; before
    # it, a model too large for one device would have to run on rank 0's CPU copy), then the newest
    # checkpoint's weights, the reference's cached log-probs, the optimizer.
    model = distributed_model(cfg, info)
    check_packed_layout(cfg, model)
    judge = build_run_judge(cfg, model, tokenizer) if cfg.trainer.judge_prompts > 0 else None
    judged = prepare_judged_validation(cfg, model, tokenizer, val_set, judge, write=info.is_main, log=log)
    context = (info.cp_rank, info.context_parallel)  # the context ranks of a group split each micro-batch
    train_set, collate = micro_batch_layout(
        cfg, train_set, model, tokenizer.eos_token_id, info.device, context
    )
    checkpointer = Checkpointer(output_dir, tokenizer, Retention.from_config(cfg.trainer))
    latest = checkpointer.resume_point(warn=log)
    if latest is not None:
        checkpointer.load_weights(latest, model)
    train_set, val_set, collate = cache_reference(cfg, model, train_set, val_set, collate)
    reference_computed = any(not c.from_cache for c in (train_set, val_set) if isinstance(c, ReferenceCache))
    trainer = build_trainer(cfg, info, model, (train_set, val_set, collate), checkpointer, timer)
    if online:
        attach_online(trainer, cfg, tokenizer, prompts, info)

    # Resume from the newest complete checkpoint, then open the trackers at that step.
    if latest is not None:
        resume_training(trainer, latest, cfg, saved_cfg)
    open_logs(cfg, info, trainer.logger, trainer.step if latest is not None else None)
    trainer.on_validation = validation_generations(cfg, model, tokenizer, val_set, trainer.logger, judged)
    trainer.should_stop = should_stop

    log(start_line(cfg, info, model, trainer))
    log(parameter_summary(model))
    try:
        trainer.fit()
    finally:
        trainer.logger.close()
    return finish(trainer, tokenized=tokenized, reference_computed=reference_computed)
