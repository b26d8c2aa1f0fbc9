"""The model across ranks: which rank this is (``DistInfo``), DDP / FSDP2 wrapping of the policy and the
reference, and the few collectives the model, the trainer and the caches need. The process group itself is
set up by ``preftune.training.distributed``; one process needs none of it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel

STRATEGIES = ("ddp", "fsdp2")  # distributed.strategy (checked in preftune.config_checks)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank if ``flag`` is true on any rank (so all ranks stop together)."""
    if not info.distributed:
        return flag
    value = torch.tensor([int(flag)], device=info.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def sum_over_ranks(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """``value`` summed over every rank (each rank passes one of the same shape)."""
    if not info.distributed:
        return value
    value = value.to(info.device).clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj``, in rank order (small Python objects: metric sums)."""
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a Hugging Face model (its ``_no_split_modules`` classes)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(
            f"{type(model).__name__}: no transformer blocks found to shard (_no_split_modules={names})"
        )
    return blocks


def shard(module: nn.Module, model: nn.Module) -> nn.Module:
    """FSDP2: shard each transformer block of ``model``, then ``module`` (the root that runs the forward)."""
    for block in _blocks(model):
        fully_shard(block)
    fully_shard(module)
    return module


def wrap_trainable(module: nn.Module, model: nn.Module, strategy: str, info: DistInfo) -> nn.Module:
    """The module the trainer calls: DDP-wrapped, FSDP2-sharded, or as is for one process."""
    if not info.distributed:
        return module
    if strategy == "fsdp2":
        return shard(module, model)
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


@contextlib.contextmanager
def gradient_sync(module: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce/reduce-scatter on all but the last micro-batch of a step."""
    if enabled:
        yield
    elif isinstance(module, DistributedDataParallel):
        with module.no_sync():
            yield
    elif isinstance(module, FSDPModule):
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        yield


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, DistributedDataParallel) else module
