"""What a person reads while a run trains: the run's set-up, one plain line per logged step when the output
is not a terminal (a log file, SLURM), quiet libraries, and a warning on the classic DPO failure."""

from __future__ import annotations

import warnings
from collections import deque

from torch import nn

from preftune.modeling.model import DPOModel


def quiet_libraries() -> None:
    """Silence transformers' per-load and per-save progress bars and the deprecation noise of libraries
    (their warnings name internals the user cannot change)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(transformers|peft|torch)(\.|$)")


def parameter_summary(model: DPOModel) -> str:
    """``policy: 1,234 of 5,678 parameters trainable (21.7%, LoRA); reference: ...``."""
    policy: nn.Module = model.policy
    total = sum(p.numel() for p in policy.parameters())
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    kind = "adapters" if trainable < total else "full fine-tuning"
    return (
        f"policy: {trainable:,} of {total:,} parameters trainable ({100 * trainable / max(1, total):.1f}%, "
        f"{kind}); reference: {model.reference.description}"
    )


def step_line(step: int, max_steps: int, metrics: dict[str, float]) -> str:
    """The plain progress line printed every ``trainer.log_every_n_steps`` when stdout is not a terminal."""
    return (
        f"step {step}/{max_steps}: loss {metrics['loss']:.4f} (preference {metrics['preference_loss']:.4f}), "
        f"acc {metrics['acc']:.3f}, margin {metrics['reward_margin_mean']:.3f}, "
        f"lr {metrics['lr']:.3g}, {metrics['pairs_per_sec']:.1f} pairs/s"
    )


def falling_chosen(chosen: list[float], margins: list[float], min_drop: float = 1.0) -> bool:
    """Whether the policy's chosen log-probs fell over the window while the reward margin grew: the
    second half's means against the first half's, chosen down by at least ``min_drop`` nats."""
    half = len(chosen) // 2
    early_chosen, late_chosen = sum(chosen[:half]) / half, sum(chosen[-half:]) / half
    early_margin, late_margin = sum(margins[:half]) / half, sum(margins[-half:]) / half
    return late_chosen <= early_chosen - min_drop and late_margin > early_margin


class ChosenLogprobWatch:
    """Warns once when the chosen responses' log-probs fall steadily while the margin grows: the policy
    wins pairs by pushing both responses down (likelihood displacement), not by preferring the chosen."""

    def __init__(self, window: int = 20):
        self.chosen: deque[float] = deque(maxlen=window)
        self.margins: deque[float] = deque(maxlen=window)
        self.warned = False

    def observe(self, metrics: dict[str, float]) -> str | None:
        """The warning to print (once), or None."""
        self.chosen.append(metrics["logps_chosen_mean"])
        self.margins.append(metrics["reward_margin_mean"])
        if self.warned or len(self.chosen) < self.chosen.maxlen:
            return None
        if not falling_chosen(list(self.chosen), list(self.margins)):
            return None
        self.warned = True
        return (
            f"warning: over the last {len(self.chosen)} steps the chosen responses' log-probs fell "
            f"({self.chosen[0]:.2f} -> {self.chosen[-1]:.2f}) while the reward margin grew "
            f"({self.margins[0]:.3f} -> {self.margins[-1]:.3f}): the policy is pushing both responses down. "
            "Try an SFT term (dpo.sft_loss_weight, e.g. 0.2), a larger dpo.ref_policy_kl_penalty, "
            "a lower optim.lr, or a loss that anchors the chosen response (apo_zero)"
        )
