"""AdamW and the cosine-with-warmup learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from preftune.config import OptimConfig

OPTIMIZERS = ("adamw",)  # the names optim.name takes (checked at config load)
SCHEDULES = ("cosine_with_warmup",)  # the names optim.sched.name takes


def build_optimizer(model: nn.Module, optim_cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on biases and norm weights (1-D tensors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": optim_cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=optim_cfg.lr,
        betas=tuple(optim_cfg.betas),
        eps=optim_cfg.eps,
    )


def cosine_with_warmup(step: int, *, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup to 1 over ``warmup_steps``, then cosine down to ``min_ratio`` at ``max_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, optim_cfg: OptimConfig, max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    sched = optim_cfg.sched
    total = sched.max_steps if sched.max_steps is not None else max_steps
    min_ratio = sched.min_lr / optim_cfg.lr if optim_cfg.lr > 0 else 0.0

    def multiplier(step: int) -> float:
        return cosine_with_warmup(step, warmup_steps=sched.warmup_steps, max_steps=total, min_ratio=min_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
