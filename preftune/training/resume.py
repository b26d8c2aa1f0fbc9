"""What a run says when it starts in an ``output_dir`` that already holds checkpoints: that the run is
already finished (and then nothing is done), or how a changed length or schedule changes the learning rate
from the step it resumes at."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torch.optim.lr_scheduler import LambdaLR

from preftune.config import PreftuneConfig, TrainerConfig, default_config
from preftune.run_dir import RunDir
from preftune.training.checkpoint import STATE_FILE, Checkpointer
from preftune.training.optim import cosine_with_warmup
from preftune.training.trainer import resolve_max_steps


@dataclass(frozen=True)
class FinishedRun:
    """A run whose newest checkpoint is already at its last step."""

    checkpoint: Path
    step: int
    val_metrics: dict[str, float]  # the last validation record of metrics.jsonl ({} if none)

    def message(self) -> str:
        return (
            f"already finished: {self.checkpoint} is step {self.step} of {self.step}; nothing to do "
            f"(raise trainer.max_steps or trainer.max_epochs to train further, or set a new output_dir)"
        )


def finished_run(output_dir: Path, trainer_cfg: TrainerConfig, steps_per_epoch: int) -> FinishedRun | None:
    """The ``FinishedRun`` in ``output_dir`` if its newest checkpoint reached this config's last step."""
    latest = Checkpointer(output_dir).latest()
    if latest is None or steps_per_epoch == 0:
        return None
    step = json.loads((latest / STATE_FILE).read_text())["step"]
    if step < resolve_max_steps(trainer_cfg, steps_per_epoch):
        return None
    return FinishedRun(latest, step, last_val_metrics(RunDir(output_dir).metrics, step))


def last_val_metrics(metrics_path: Path, step: int) -> dict[str, float]:
    """The ``val/`` metrics logged at ``step`` (without the prefix), or {}."""
    if not metrics_path.is_file():
        return {}
    for line in reversed(metrics_path.read_text().splitlines()):
        record = json.loads(line) if line else {}
        if record.get("step") == step and any(k.startswith("val/") for k in record):
            return {k.removeprefix("val/"): v for k, v in record.items() if k.startswith("val/")}
    return {}


@dataclass(frozen=True)
class Schedule:
    """The learning-rate schedule a config gives: peak ``lr``, ``warmup`` steps, cosine down to ``min_lr``
    at ``total`` steps."""

    lr: float
    warmup: int
    min_lr: float
    total: int

    @classmethod
    def of(cls, cfg: PreftuneConfig, steps_per_epoch: int) -> Schedule:
        sched = cfg.optim.sched
        total = (
            sched.max_steps
            if sched.max_steps is not None
            else resolve_max_steps(cfg.trainer, steps_per_epoch)
        )
        return cls(float(cfg.optim.lr), int(sched.warmup_steps), float(sched.min_lr), int(total))

    def lr_at(self, step: int) -> float:
        ratio = self.min_lr / self.lr if self.lr > 0 else 0.0
        return self.lr * cosine_with_warmup(
            step, warmup_steps=self.warmup, max_steps=self.total, min_ratio=ratio
        )


def schedule_change(saved: DictConfig, now: DictConfig, step: int, steps_per_epoch: int) -> str | None:
    """One line on how resuming at ``step`` under ``now`` changes the schedule ``saved`` was running (None if
    it does not): the learning rate is recomputed from the new settings at the step reached."""
    before, after = Schedule.of(saved, steps_per_epoch), Schedule.of(now, steps_per_epoch)
    if before == after:
        return None
    changes = [
        f"{name} {old:g} -> {new:g}"
        for name, old, new in (
            ("schedule length", before.total, after.total),
            ("warmup_steps", before.warmup, after.warmup),
            ("lr", before.lr, after.lr),
            ("min_lr", before.min_lr, after.min_lr),
        )
        if old != new
    ]
    return (
        f"resuming at step {step} with a changed learning-rate schedule ({', '.join(changes)}): the LR "
        f"continues from {after.lr_at(step):.3g} (was {before.lr_at(step):.3g} at this step) and reaches "
        f"{after.min_lr:g} at step {after.total}"
    )


def restart_schedule(scheduler: LambdaLR, lr: float) -> None:
    """Make a restored scheduler follow this config: peak ``lr`` (the checkpoint holds the saved one) and
    the new multiplier at the step reached, applied before the next optimizer step."""
    scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
    groups = scheduler.optimizer.param_groups
    for group, fn in zip(groups, scheduler.lr_lambdas, strict=True):
        group["lr"] = lr * fn(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in groups]


def saved_config(output_dir: Path) -> DictConfig | None:
    """The ``config.yaml`` an earlier run wrote in ``output_dir`` (over the defaults), or None. Merged untyped:
    a config written by another preftune version (a key added or gone) is still read."""
    path = RunDir(output_dir).config
    if not path.is_file():
        return None
    return OmegaConf.merge(OmegaConf.to_container(default_config()), OmegaConf.load(path))
