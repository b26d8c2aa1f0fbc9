"""``DPOTrainer``: the training loop (epochs, steps, validation, checkpoints, time limit)."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from preftune.config import PreftuneConfig, TrainerConfig
from preftune.data.batch import MicroBatch
from preftune.modeling.model import DPOModel
from preftune.modeling.parallel import DistInfo, any_rank, clip_grad_norm, gather_objects, sum_over_ranks
from preftune.modeling.router import GlobalRouting, RoutingStatistics
from preftune.training import stop_signals
from preftune.training.checkpoint import Checkpointer
from preftune.training.console import ChosenLogprobWatch, step_line
from preftune.training.metrics import MetricsLogger
from preftune.training.nonfinite import SkipGuard
from preftune.training.online import OnlineStep
from preftune.training.progress import after_step, run_length
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
        """(metric means, total pairs, total tokens) over every rank, in one collective; of a data-parallel
        group's tensor- and context-parallel ranks (which computed the same pairs) only one counts."""
        local = ({key: value.item() for key, value in self.sums.items()}, self.pairs, self.tokens)
        if not info.is_data_leader:
            local = ({}, 0, 0)
        totals: dict[str, float] = {}
        pairs = tokens = 0
        for sums, count, rank_tokens in gather_objects(local, info):
            for key, value in sums.items():
                totals[key] = totals.get(key, 0.0) + value
            pairs += count
            tokens += rank_tokens
        return {key: value / max(1, pairs) for key, value in totals.items()}, pairs, tokens


def resolve_max_steps(trainer_cfg: TrainerConfig, steps_per_epoch: int) -> int:
    """The run's length: the first of ``max_steps`` and ``max_epochs`` reached (-1 / null: no limit)."""
    return run_length(trainer_cfg.max_epochs, trainer_cfg.max_steps, steps_per_epoch).steps


def limit_batches(limit: int | float, available: int) -> int:
    """``trainer.limit_val_batches``: an int is a count, a float a fraction of ``available``."""
    if isinstance(limit, float):
        return min(available, math.ceil(limit * available))
    return min(available, limit)


@torch.no_grad()
def global_routing(model: DPOModel, batches: list[tuple[MicroBatch, bool]]) -> GlobalRouting | None:
    """``model.router_aux_loss_scope=global_batch``: the routing statistics of the whole global batch
    (this rank's micro-batches, fillers not counted, summed over ranks), from one forward of each
    without gradients. None when the balancing loss is per micro-batch, or the global batch is one
    micro-batch on one rank (its own statistics are then the global batch's: no extra forward)."""
    router = model.policy_runner.router
    if router is None or router.scope != "global_batch" or (len(batches) == 1 and not model.dist.distributed):
        return None
    total, pairs = None, 0
    for batch, is_filler in batches:  # every rank runs as many forwards (FSDP2 gathers weights in each)
        vector = model.routing_statistics(batch).as_vector().double()
        total = vector * (not is_filler) + (0 if total is None else total)
        pairs += 0 if is_filler else batch.num_pairs
    total = sum_over_ranks(torch.cat([total, total.new_tensor([pairs])]), model.dist)
    return GlobalRouting(RoutingStatistics.from_vector(total[:-1].float()), int(total[-1].item()))


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
        batches = micro_batches(global_batch)
        with model.global_routing(global_routing(model, batches)):
            for batch, is_filler in batches:
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
        # asked after each validation during training (given the step and the validation metrics): True
        # stops the run there, saved like a stop signal (e.g. a sweep pruning a trial)
        self.should_stop: Callable[[int, dict[str, float]], bool] | None = None
        self.stopped_by_callback = False
        self.online: OnlineStep | None = None  # online DPO: the batches are prompts, made into pairs per step
        # online: lays out the step's pairs (with a reference: carrying their ref_logps), and the completions
        # the reference scores (None: reference-free, or scored in the step on K-completion groups)
        self.online_collate: Callable[[Sequence[dict]], list[MicroBatch]] | None = None
        self.reference_collate: Callable[[Sequence[dict]], list[MicroBatch]] | None = None
        # online, packed or with a shared prompt: the step's pairs as K-completion groups (each prompt's
        # responses once, data.packing.group_by_prompt) for online_collate, the reference run on the same rows
        self.group_pairs: Callable[[list[dict]], list[dict]] | None = None

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
    def micro_batches(
        self, pairs: list[dict], collate: Callable[[Sequence[dict]], list[MicroBatch]] | None = None
    ) -> list[tuple[MicroBatch, bool]]:
        """This rank's micro-batches (by ``collate``, default ``collate_fn``) as (batch, is_filler); every rank
        gets the same number, made up with filler repeats of a real micro-batch that count for nothing,
        because FSDP2 gathers weights per forward and every rank must join each one."""
        collate = collate or self.collate_fn
        batches = collate(pairs)
        needed = len(batches)
        if self.model.dist.distributed:
            needed = max(gather_objects(len(batches), self.model.dist))
            if not batches and needed:
                batches = collate([self.filler_pair])
                return [(batches[0], True)] * needed
        return [(b, False) for b in batches] + [(batches[0], True)] * (needed - len(batches))

    def train_single_step(
        self,
        global_batch: list[dict],
        total_pairs: int | None = None,
        collate: Callable[[Sequence[dict]], list[MicroBatch]] | None = None,
    ) -> dict[str, float]:
        """One optimizer step on this rank's pairs of a global batch of ``total_pairs`` pairs over all ranks
        (None: ``data.global_batch_size``), laid out by ``collate`` (None: ``collate_fn``)."""
        total_pairs = total_pairs or self.global_batch_size
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        accumulator = MetricsAccumulator()
        averaged_over = self.model.dist.gradient_ranks
        batches = self.micro_batches(global_batch, collate)
        with self.model.global_routing(global_routing(self.model, batches)):
            for i, (batch, is_filler) in enumerate(batches):
                num_pairs = 0 if is_filler else batch.num_pairs
                with self.model.gradient_sync(i == len(batches) - 1):
                    loss, metrics = self.model.get_loss_and_metrics(batch, forward_only=False)
                    # DDP and FSDP2 average gradients over the data- and context-parallel ranks: scale to
                    # the global batch's pair count.
                    (loss * (num_pairs * averaged_over / total_pairs)).backward()
                if not is_filler:
                    accumulator.add(metrics, num_pairs, batch.num_tokens)
        params = [p for p in self.model.policy.parameters() if p.requires_grad]
        clip = self.cfg.trainer.gradient_clip_val
        grad_norm = clip_grad_norm(params, clip if clip else float("inf"))  # one device sync per step
        lr = self.optimizer.param_groups[0]["lr"]
        metrics, pairs, tokens = accumulator.reduce(self.model.dist)
        # a NaN/inf loss or gradient norm: not applied. Its gradients are dropped, so the optimizer step skips
        # every parameter (weights and optimizer state unchanged); the scheduler and data position advance.
        skipped = self.skip_guard.skip(self.step + 1, metrics["loss"], grad_norm)
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.model.observe_step_rewards(
                metrics["rewards_chosen_mean"], metrics["rewards_rejected_mean"], pairs
            )
        self.optimizer.step()
        self.scheduler.step()
        metrics.update(grad_norm=grad_norm, lr=lr, tokens=tokens, skipped=int(skipped))
        return metrics

    # -- one online step -----------------------------------------------------------------------------
    def online_step(self, prompts: list[dict]) -> dict[str, float]:
        """Online DPO: this rank's prompts become pairs (generate, judge, pair), then one optimizer step on
        them. A global batch with no pair (every prompt tied) is skipped: no update, the schedule advances."""
        batch = self.online(prompts, self.step + 1)
        if batch.total_pairs == 0:
            self.print(
                f"step {self.step + 1}: no usable pair in the global batch (all tied or unscored): skipped"
            )
            lr = self.optimizer.param_groups[0]["lr"]
            self.optimizer.zero_grad(set_to_none=True)
            self.optimizer.step()  # over no gradients (nothing changes), so the scheduler steps in order
            self.scheduler.step()
            return {**batch.metrics, "lr": lr, "tokens": 0, "pairs": 0}
        if self.group_pairs is not None:  # each prompt's responses laid out once; the step runs the reference
            items = self.group_pairs(batch.pairs)
        else:
            items = self.attach_reference(batch.pairs)
        metrics = self.train_single_step(items, batch.total_pairs, self.online_collate)
        return {**metrics, **batch.metrics, "pairs": batch.total_pairs}

    @torch.no_grad()
    def attach_reference(self, pairs: list[dict]) -> list[dict]:
        """``pairs`` numbered and carrying their reference log-probs (``ref_logps``), computed once per
        distinct completion (a completion in several pairs, ``all_pairs``, is scored once): the completions
        are laid out two by two, each with its prompt, in ``reference_collate``'s micro-batches."""
        if self.reference_collate is None:  # reference-free losses
            return [{**pair, "index": i} for i, pair in enumerate(pairs)]
        completions: dict[tuple, tuple[list[int], list[int]]] = {}
        for pair in pairs:
            for key, ids in zip(
                pair["completion_keys"], (pair["chosen_ids"], pair["rejected_ids"]), strict=True
            ):
                completions[key] = (pair["prompt_ids"], ids)
        by_prompt: dict[int, list[tuple]] = {}
        for key in completions:
            by_prompt.setdefault(key[0], []).append(key)
        layout = []
        for keys in by_prompt.values():
            for first, second in zip(keys[::2], keys[1::2] + keys[-1:] * (len(keys) % 2), strict=True):
                layout.append(
                    {
                        "prompt_ids": completions[first][0],
                        "chosen_ids": completions[first][1],
                        "rejected_ids": completions[second][1],
                        "chosen_reward": 0.0,
                        "rejected_reward": 0.0,
                        "index": len(layout),
                        "keys": (first, second),
                    }
                )
        logps: dict[tuple, float] = {}
        for batch, is_filler in self.micro_batches(layout, self.reference_collate):
            values = self.model.reference.logprobs(batch.to(self.model.device)).tolist()
            if is_filler:
                continue
            for n, index in enumerate(batch.indices.tolist()):
                first, second = layout[index]["keys"]
                logps[first], logps[second] = values[n], values[batch.num_pairs + n]
        return [
            {**pair, "index": i, "ref_logps": tuple(logps[key] for key in pair["completion_keys"])}
            for i, pair in enumerate(pairs)
        ]

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
        # The flag first: a second Ctrl-C can interrupt this handler while it prints (Python runs a pending
        # handler between any two bytecodes, its own included), and must then find the first one counted.
        again, self.stop_requested = self.stop_requested, True
        stop_signals.on_stop_signal(signum, again=again, announce=self.model.dist.is_main)

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
                    else "should_stop asked for it after validation (e.g. a sweep pruning the trial)"
                    if self.stopped_by_callback
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
                if self.online is None:
                    metrics = self.train_single_step(global_batch)
                else:
                    metrics = self.online_step(global_batch)
                elapsed = time.monotonic() - start
                self._slowest_step = max(self._slowest_step, elapsed)
                self.step += 1
                self.consumed_samples += self.global_batch_size
                metrics.update(
                    step_time=elapsed,
                    pairs_per_sec=metrics.pop("pairs", self.global_batch_size) / elapsed,
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
                asked_to_stop = False
                if actions.validate:
                    self._validate_and_log()
                    validated_at = self.step
                    asked_to_stop = not actions.stop and self._asked_to_stop()  # before the save it may make
                if actions.save:
                    self.save()
                    saved_at = self.step
                if actions.stop:
                    break
                if asked_to_stop:
                    return validated_at, saved_at, True
        return validated_at, saved_at, bool(actions and actions.stopping_early)

    def _asked_to_stop(self) -> bool:
        """``should_stop`` after a validation during training (every rank takes the same decision)."""
        if self.should_stop is None or not self.last_val_metrics:
            return False
        self.stopped_by_callback = any_rank(
            self.should_stop(self.step, self.last_val_metrics), self.model.dist
        )
        return self.stopped_by_callback

    def _report_step(self, metrics: dict[str, float], progress: tqdm, terminal: bool) -> None:
        """A finished step's metrics to the logger (every ``log_every_n_steps``), the console and the
        falling-chosen watch."""
        if "loss" not in metrics:  # an online batch with no pair: nothing trained
            self.logger.log_metrics(metrics, self.step, prefix="train")
            progress.update(1)
            return
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
