"""PyTorch distributed set-up: the process group from torchrun/SLURM variables, its end, and rank 0 going
first through one-off work. One process without a launcher needs none of it. The model's side (``DistInfo``,
DDP / FSDP2 wrapping, the few collectives) is ``preftune.modeling.parallel``."""

from __future__ import annotations

import contextlib
import functools
import gc
import os
from collections.abc import Iterator
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from preftune.modeling.parallel import MESH_DIMS, DistInfo
from preftune.training.launcher import env_int, env_rank, env_world_size

TIMEOUT_ENV = "PREFTUNE_DIST_TIMEOUT_S"  # the process group's timeout in seconds, when set
UNBOUNDED_WAIT = timedelta(days=7)  # how long ranks wait for rank 0's one-off work (tokenizing a data set)


def init_distributed(
    tensor_parallel: int = 1, context_parallel: int = 1, timeout_minutes: int = 30
) -> DistInfo:
    """Join the process group described by torchrun's (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) or SLURM's
    (``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``) variables: nccl on CUDA, gloo on CPU; with tensor
    or context parallelism, the ("dp", "cp", "tp") device mesh over it (``preftune.modeling.parallel``).
    ``config_checks.check_environment`` has checked that T * C divides the world size."""
    world_size = env_world_size()
    rank = env_rank()
    local_rank = env_int("LOCAL_RANK", "SLURM_LOCALID") or 0
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
    mesh = None
    if tensor_parallel * context_parallel > 1:
        shape = (world_size // (tensor_parallel * context_parallel), context_parallel, tensor_parallel)
        mesh = device_mesh(device.type, shape)
    return DistInfo(rank, world_size, local_rank, device, tensor_parallel, context_parallel, mesh)


@functools.cache
def device_mesh(device_type: str, shape: tuple[int, int, int]) -> DeviceMesh:
    """The ("dp", "cp", "tp") mesh of ``shape``, built once per process (each build makes new groups)."""
    return init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)


def shutdown(wait: bool = True) -> None:
    """Leave the process group once every rank is done (``wait=False``: at once, after an error, when the
    other ranks may never reach the barrier).

    A trained DDP / FSDP2 model outlives the run in reference cycles, holding the group (DDP's reducer,
    FSDP2's device mesh). They are collected here, so that no model, group or gloo thread is left for the
    interpreter's exit to tear down: a gloo thread releasing a tensor then needs the GIL of an interpreter
    that is going away, and the rank aborts ("terminate called without an active exception")."""
    if dist.is_initialized():
        device_mesh.cache_clear()  # the mesh holds its groups too
        gc.collect()
        if wait:
            dist.barrier()
        dist.destroy_process_group()


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
