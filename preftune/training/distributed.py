"""PyTorch distributed set-up: process group from torchrun/SLURM variables, DDP and FSDP2 wrapping,
and the few collectives the trainer needs. One process without a launcher needs none of it."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel

STRATEGIES = ("ddp", "fsdp2")
TIMEOUT_ENV = "PREFTUNE_DIST_TIMEOUT_S"  # the process group's timeout in seconds, when set
UNBOUNDED_WAIT = timedelta(days=7)  # how long ranks wait for rank 0's one-off work (tokenizing a data set)


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


def _env_int(*names: str) -> int | None:
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    return None


def env_rank() -> int:
    """This process's global rank from the launcher's variables (0 without a launcher)."""
    return _env_int("RANK", "SLURM_PROCID") or 0


def env_world_size() -> int:
    """The number of ranks the launcher started (1 without a launcher)."""
    return _env_int("WORLD_SIZE", "SLURM_NTASKS") or 1


def init_distributed(timeout_minutes: int = 30) -> DistInfo:
    """Join the process group described by torchrun's (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) or SLURM's
    (``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``) variables: nccl on CUDA, gloo on CPU."""
    world_size = env_world_size()
    rank = env_rank()
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID") or 0
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, timeout_minutes * 60))),
        )
    return DistInfo(rank, world_size, local_rank, device)


def shutdown(wait: bool = True) -> None:
    """Leave the process group once every rank is done (``wait=False``: at once, after an error, when the
    other ranks may never reach the barrier)."""
    if dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


@contextlib.contextmanager
def main_rank_first(info: DistInfo) -> Iterator[None]:
    """Run the body on rank 0, then on the other ranks (which then find what rank 0 cached).

    The other ranks wait on a gloo group of its own whose timeout is days, not the process group's
    minutes, so rank 0 may take as long as the data needs (a rank that fails ends the job through torchrun).
    """
    if not info.distributed:
        yield
        return
    group = dist.new_group(backend="gloo", timeout=UNBOUNDED_WAIT)
    if not info.is_main:
        dist.barrier(group=group)
    try:
        yield
    finally:  # rank 0 failed too (a mistake in the data): the others go on to find it, and all stop together
        if info.is_main:
            dist.barrier(group=group)
        dist.destroy_process_group(group)


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
    if strategy not in STRATEGIES:
        raise ValueError(f"distributed.strategy={strategy!r}: choose one of {STRATEGIES}")
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
