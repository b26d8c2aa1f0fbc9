"""``DPOTrainer``: the training loop (epochs, steps, validation, checkpoints, time limit)."""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from preftune.config import PreftuneConfig, TrainerConfig
from preftune.data.batch import MicroBatch
from preftune.modeling.model import DPOModel
from preftune.modeling.parallel import DistInfo, any_rank, gather_objects
from preftune.training import stop_signals
from preftune.training.checkpoint import Checkpointer
from preftune.training.console import ChosenLogprobWatch, step_line
from preftune.training.metrics import MetricsLogger
from preftune.training.nonfinite import SkipGuard
from preftune.training.progress import after_step
from preftune.training.timer import RunTimer


class MetricsAccumulator:
    """Pair-weighted means of per-micro-batch metrics over micro-batches and ranks (a micro-batch of n pairs
    counts n times, wherever it ran), and the total of real tokens processed."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.pairs = 0
        self.tokens = 0

    def add(self, metrics: dict[str, torch.Tensor], num_pairs: int, num_tokens: int = 0) -> None:
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + value.detach().double() * num_pairs
        self.pairs += num_pairs
        self.tokens += num_tokens

    def reduce(self, info: DistInfo) -> tuple[dict[str, float], int, int]:
        """(metric means, total pairs, total tokens) over every rank, in one collective."""
        local = ({key: value.item() for key, value in self.sums.items()}, self.pairs, self.tokens)
        totals: dict[str, float] = {}
        pairs = tokens = 0
        for sums, count, rank_tokens in gather_objects(local, info):
            for key, value in sums.items():
                totals[key] = totals.get(key, 0.0) + value
            pairs += count
            tokens += rank_tokens
        return {key: value / max(1, pairs) for key, value in totals.items()}, pairs, tokens


def resolve_max_steps(trainer_cfg: TrainerConfig, steps_per_epoch: int) -> int:
    """The run's length: the first of ``max_steps`` (-1: none) and ``max_epochs`` (null: none) reached."""
    limits = [trainer_cfg.max_steps] if trainer_cfg.max_steps != -1 else []
    if trainer_cfg.max_epochs is not None:
        limits.append(trainer_cfg.max_epochs * steps_per_epoch)
    return min(limits)


def limit_batches(limit: int | float, available: int) -> int:
    """``trainer.limit_val_batches``: an int is a count, a float a fraction of ``available``."""
    if isinstance(limit, float):
        return min(available, math.ceil(limit * available))
    return min(available, limit)


@torch.no_grad()
def evaluate(
    model: DPOModel,
    dataloader: Iterable[list[dict]],
    micro_batches: Callable[[list[dict]], list[tuple[MicroBatch, bool]]],
    limit: int | float,
) -> tuple[dict[str, float], int]:
    """Pair-weighted mean metrics of ``model`` (in eval mode) over up to ``limit`` (``limit_batches``) of
    ``dataloader``'s global batches, and the pairs they hold; ``micro_batches`` turns a global batch into this
    rank's (micro-batch, is_filler) pairs. ``DPOTrainer.evaluate`` and ``preftune eval`` both run it."""
    model.train(False)
    accumulator = MetricsAccumulator()
    num_batches = limit_batches(limit, len(dataloader))
    for i, global_batch in enumerate(dataloader):
        if i >= num_batches:
            break
        for batch, is_filler in micro_batches(global_batch):
            _, metrics = model.get_loss_and_metrics(batch, forward_only=True)
            if not is_filler:
                accumulator.add(metrics, batch.num_pairs)
    means, pairs, _ = accumulator.reduce(model.dist)
    return means, pairs


class DPOTrainer:
    """Trains a ``DPOModel`` on global batches of preference pairs (NeMo Aligner's ``DPOTrainer`` API:
    ``fit()``, ``run_validation() -> (loss, metrics)``, ``state_dict()`` / ``load_state_dict()``).

    Supports: gradient accumulation (micro-batches of any layout: ``collate_fn`` turns this rank's share of a
    global batch into ``MicroBatch``es, e.g. ``padded_micro_batches`` or ``DPOPackedDataset.global_collate_fn``);
    one process, DDP or FSDP2 (ranks whose share has fewer micro-batches run filler ones that count for
    nothing); validation every ``trainer.val_check_interval`` steps, checkpoints every ``save_interval``, and
    a clean stop (validate, save) at ``max_steps``/``max_epochs``, before ``trainer.max_time`` or on
    SIGTERM/SIGUSR1 (the decision: ``preftune.training.progress.after_step``); exact resume from
    ``state_dict`` (step, consumed samples, epoch, loss state).

    Assumes: the train dataloader's ``batch_sampler`` is a ``GlobalBatchSampler`` (its ``set_epoch`` positions
    a resumed run) and yields lists of tokenized pairs; every rank calls ``fit`` together.

    Each micro-batch's loss is weighted by its share of the global batch's pairs, so gradient accumulation
    reproduces the full-batch objective whatever the split; metrics are averaged by pair count over
    micro-batches and ranks, never summed.

    Raises: ``ValueError`` when the training set holds fewer pairs than one global batch.
    """

    def __init__(
        self,
        cfg: PreftuneConfig,
        model: DPOModel,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        train_dataloader: Iterable[list[dict]],
        val_dataloader: Iterable[list[dict]] | None,
        test_dataloader: Iterable[list[dict]] | None,
        collate_fn: Callable[[Sequence[dict]], list[MicroBatch]],
        logger: MetricsLogger,
        ckpt_callback: Checkpointer,
        run_timer: RunTimer,
    ):
        self.cfg = cfg
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.train_dataloader = train_dataloader
        self.val_dataloader = val_dataloader
        self.test_dataloader = test_dataloader
        self.collate_fn = collate_fn
        self.logger = logger
        self.ckpt_callback = ckpt_callback
        self.run_timer = run_timer
        self.global_batch_size: int = cfg.data.global_batch_size
        self.step = 0
        self.consumed_samples = 0
        self.epoch = 0
        self.sampler = train_dataloader.batch_sampler
        self.steps_per_epoch: int = self.sampler.batches_per_epoch
        tcfg = cfg.trainer
        self.max_steps = resolve_max_steps(tcfg, self.steps_per_epoch)
        interval = tcfg.val_check_interval
        self.val_check_interval = (
            max(1, round(interval * self.steps_per_epoch)) if isinstance(interval, float) else int(interval)
        )
        self.last_val_metrics: dict[str, float] = {}
        self.last_val_step = -1
        self.skip_guard = SkipGuard(tcfg.max_skipped_steps, self.print)
        # a real pair to run on a rank whose share of a (last, partial) validation batch is empty
        self.filler_pair: dict = train_dataloader.dataset[0]
        self.stop_requested = False  # set by SIGTERM/SIGUSR1 (e.g. SLURM preemption) or Ctrl-C
        self._slowest_step = 0.0
        self._slowest_val_and_save = 0.0
        self.chosen_watch = ChosenLogprobWatch()
        # called at each validation with the step: generations (samples, judging); returns more val/ metrics
        self.on_validation: Callable[[int], dict[str, float]] | None = None

    # -- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "consumed_samples": self.consumed_samples,
            "epoch": self.epoch,
            "loss_state": self.model.loss_state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self.consumed_samples = state["consumed_samples"]
        self.epoch = state["epoch"]
        self.model.load_loss_state_dict(state.get("loss_state", {}))

    def save(self) -> None:
        start = time.monotonic()
        self.ckpt_callback.save(
            self.step,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            trainer_state=self.state_dict(),
            val_metrics=(
                {f"val/{k}": v for k, v in self.last_val_metrics.items()}
                if self.last_val_step == self.step
                else None
            ),
        )
        self._slowest_val_and_save = max(self._slowest_val_and_save, time.monotonic() - start)

    # -- one optimizer step --------------------------------------------------------------------------
    def micro_batches(self, pairs: list[dict]) -> list[tuple[MicroBatch, bool]]:
        """This rank's micro-batches as (batch, is_filler); every rank gets the same number, made up with
        filler repeats of a real micro-batch that count for nothing, because FSDP2 gathers weights per
        forward and every rank must join each one."""
        batches = self.collate_fn(pairs)
        needed = len(batches)
        if self.model.dist.distributed:
            needed = max(gather_objects(len(batches), self.model.dist))
            if not batches and needed:
                batches = self.collate_fn([self.filler_pair])
                return [(batches[0], True)] * needed
        return [(b, False) for b in batches] + [(batches[0], True)] * (needed - len(batches))

    def train_single_step(self, global_batch: list[dict]) -> dict[str, float]:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        accumulator = MetricsAccumulator()
        world = self.model.dist.world_size
        batches = self.micro_batches(global_batch)
        for i, (batch, is_filler) in enumerate(batches):
            num_pairs = 0 if is_filler else batch.num_pairs
            with self.model.gradient_sync(i == len(batches) - 1):
                loss, metrics = self.model.get_loss_and_metrics(batch, forward_only=False)
                # DDP and FSDP2 average gradients over ranks: scale to the global batch's pair count.
                (loss * (num_pairs * world / self.global_batch_size)).backward()
            if not is_filler:
                accumulator.add(metrics, num_pairs, batch.num_tokens)
        params = [p for p in self.model.policy.parameters() if p.requires_grad]
        clip = self.cfg.trainer.gradient_clip_val
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip else float("inf"))
        if isinstance(grad_norm, DTensor):
            grad_norm = grad_norm.full_tensor()
        grad_norm = grad_norm.item()  # one device sync per step
        lr = self.optimizer.param_groups[0]["lr"]
        metrics, pairs, tokens = accumulator.reduce(self.model.dist)
        # a NaN/inf loss or gradient norm: not applied (the scheduler and data position still advance)
        skipped = self.skip_guard.skip(self.step + 1, metrics["loss"], grad_norm)
        if not skipped:
            self.optimizer.step()
            self.model.observe_step_rewards(
                metrics["rewards_chosen_mean"], metrics["rewards_rejected_mean"], pairs
            )
        with warnings.catch_warnings():  # a skipped first step steps the scheduler before the optimizer
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            self.scheduler.step()
        metrics.update(grad_norm=grad_norm, lr=lr, tokens=tokens, skipped=int(skipped))
        return metrics

    # -- evaluation ----------------------------------------------------------------------------------
    def evaluate(self, dataloader: Iterable[list[dict]], limit: int | float) -> dict[str, float]:
        """Pair-weighted metrics over (up to ``limit`` of) ``dataloader``'s global batches."""
        metrics, _ = evaluate(self.model, dataloader, self.micro_batches, limit)
        self.model.train()
        return metrics

    def run_validation(self) -> tuple[float, dict[str, float]]:
        """Pair-weighted mean loss and metrics over (up to ``limit_val_batches`` of) the validation set."""
        start = time.monotonic()
        metrics = self.evaluate(self.val_dataloader, self.cfg.trainer.limit_val_batches)
        self._slowest_val_and_save = max(self._slowest_val_and_save, time.monotonic() - start)
        return metrics["loss"], metrics

    def run_test(self) -> tuple[float, dict[str, float]]:
        """Like ``run_validation`` over the whole test set."""
        metrics = self.evaluate(self.test_dataloader, 1.0)
        return metrics["loss"], metrics

    def _validate_and_log(self) -> None:
        if self.val_dataloader is None or self.cfg.trainer.limit_val_batches == 0:
            return
        _, metrics = self.run_validation()
        if self.on_validation is not None:  # generations: samples, judged metrics
            metrics.update(self.on_validation(self.step))
        self.logger.log_metrics(metrics, self.step, prefix="val")
        self.last_val_metrics = metrics
        self.last_val_step = self.step
        judged = (
            f", win rate {metrics['win_rate']:.3f} (LC {metrics['lc_win_rate']:.3f})"
            if "win_rate" in metrics
            else ""
        )
        self.print(
            f"step {self.step}: val loss {metrics['loss']:.4f} (preference {metrics['preference_loss']:.4f}), "
            f"acc {metrics['acc']:.3f}, "
            f"margin {metrics['reward_margin_mean']:.3f}{judged}"
        )

    def print(self, message: str) -> None:
        if self.model.dist.is_main:
            tqdm.write(message)

    def _request_stop(self, signum: int, frame: Any) -> None:
        stop_signals.on_stop_signal(signum, again=self.stop_requested, announce=self.model.dist.is_main)
        self.stop_requested = True

    # -- the loop ------------------------------------------------------------------------------------
    def fit(self) -> None:
        """Train until ``max_steps`` (or ``max_epochs``), validating every ``val_check_interval`` steps,
        saving every ``save_interval`` steps and at the end; stop cleanly (validate, save) before
        ``max_time`` or on SIGTERM/SIGUSR1/SIGINT (see ``stop_signals``)."""
        handlers = stop_signals.install(self._request_stop)
        terminal = sys.stdout.isatty()  # else (a log file, SLURM) one plain line per logged step
        progress = tqdm(
            total=self.max_steps,
            initial=self.step,
            desc="training",
            unit="step",
            dynamic_ncols=True,
            disable=not self.model.dist.is_main or not terminal,
            delay=1,  # drawn once training is under way, below the step-0 validation's line
        )
        try:
            if self.step == 0 and self.cfg.trainer.val_before_training:
                self._validate_and_log()  # the baseline, logged as step 0
            validated_at, saved_at, stopping_early = self._train_steps(progress, terminal)
            progress.close()
            if stopping_early:
                why = (
                    "a stop signal was received"
                    if self.stop_requested
                    else "trainer.max_time is nearly reached"
                )
                self.print(f"stopping at step {self.step}: {why}")
            if validated_at != self.step:
                self._validate_and_log()
            if saved_at != self.step and self.step > 0:
                self.save()
        finally:
            progress.close()
            stop_signals.restore(handlers)

    def _train_steps(self, progress: tqdm, terminal: bool) -> tuple[int, int, bool]:
        """The training loop of ``fit``: steps until ``max_steps`` or an early stop. Returns the steps last
        validated and saved at (-1: not in this run) and whether it stopped early."""
        samples_per_epoch = self.steps_per_epoch * self.global_batch_size
        validated_at = -1
        saved_at = self.step if self.step > 0 else -1  # a resumed run starts from a saved checkpoint
        actions = None
        while self.step < self.max_steps and not (actions and actions.stop):
            start_batch = (self.consumed_samples - self.epoch * samples_per_epoch) // self.global_batch_size
            if start_batch >= self.steps_per_epoch:
                self.epoch += 1
                continue
            self.sampler.set_epoch(self.epoch, start_batch)
            for global_batch in self.train_dataloader:
                start = time.monotonic()
                metrics = self.train_single_step(global_batch)
                elapsed = time.monotonic() - start
                self._slowest_step = max(self._slowest_step, elapsed)
                self.step += 1
                self.consumed_samples += self.global_batch_size
                metrics.update(
                    step_time=elapsed,
                    pairs_per_sec=self.global_batch_size / elapsed,
                    tokens_per_sec=metrics.pop("tokens") / elapsed,
                    epoch=self.epoch,
                    consumed_samples=self.consumed_samples,
                )
                self._report_step(metrics, progress, terminal)
                budget = 2 * self._slowest_step + self._slowest_val_and_save
                # every rank agrees before acting on a stop signal or the time limit
                stop_early = any_rank(
                    self.stop_requested or not self.run_timer.is_within_limit(budget), self.model.dist
                )
                actions = after_step(
                    self.step,
                    max_steps=self.max_steps,
                    val_check_interval=self.val_check_interval,
                    save_interval=self.cfg.trainer.save_interval,
                    stop_early=stop_early,
                )
                if actions.validate:
                    self._validate_and_log()
                    validated_at = self.step
                if actions.save:
                    self.save()
                    saved_at = self.step
                if actions.stop:
                    break
        return validated_at, saved_at, bool(actions and actions.stopping_early)

    def _report_step(self, metrics: dict[str, float], progress: tqdm, terminal: bool) -> None:
        """A finished step's metrics to the logger (every ``log_every_n_steps``), the console and the
        falling-chosen watch."""
        if self.step % self.cfg.trainer.log_every_n_steps == 0:
            self.logger.log_metrics(metrics, self.step, prefix="train")
            if not terminal:
                self.print(step_line(self.step, self.max_steps, metrics))
        warning = self.chosen_watch.observe(metrics)
        if warning:
            self.print(f"[preftune] {warning}")
        progress.update(1)
        progress.set_postfix(
            loss=f"{metrics['loss']:.4f}",
            pref=f"{metrics['preference_loss']:.4f}",
            acc=f"{metrics['acc']:.2f}",
            pairs_s=f"{metrics['pairs_per_sec']:.1f}",
        )
