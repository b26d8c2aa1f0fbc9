"""The model across ranks: which rank this is and where it sits in the device mesh (``DistInfo``), DDP / FSDP2
wrapping of the policy and the reference, the gradient norm over parameters on several meshes, and the few
collectives the model, the trainer and the caches need. The process group and the mesh are set up by
``preftune.training.distributed``; one process needs none of it.

The mesh (``distributed.tensor_parallel: T``, ``distributed.context_parallel: C``) has dimensions
("dp", "cp", "tp") of sizes (world / (T * C), C, T), tensor-parallel ranks innermost (neighbours, one node).
Rank ``(dp * C + cp) * T + tp``: the T ranks of a tensor-parallel group hold shards of every block's weights;
the C ranks of a context-parallel group hold parts of every row; FSDP2 shards the parameters over the dp x cp
ranks. Every rank of one data-parallel group (its C x T ranks) reads the same pairs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

STRATEGIES = ("ddp", "fsdp2")  # distributed.strategy (checked in preftune.config_checks)


MESH_DIMS = ("dp", "cp", "tp")


@dataclass(frozen=True)
class DistInfo:
    """This process's place among the ranks. ``mesh`` is the ("dp", "cp", "tp") device mesh, None unless
    tensor or context parallelism is on (T * C > 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    tensor_parallel: int = 1
    context_parallel: int = 1
    mesh: DeviceMesh | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def data_parallel(self) -> int:
        """The number of data-parallel groups (each reads its own share of a global batch)."""
        return self.world_size // (self.tensor_parallel * self.context_parallel)

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tensor_parallel

    @property
    def cp_rank(self) -> int:
        return self.rank // self.tensor_parallel % self.context_parallel

    @property
    def dp_rank(self) -> int:
        return self.rank // (self.tensor_parallel * self.context_parallel)

    @property
    def is_data_leader(self) -> bool:
        """The one rank of its data-parallel group whose metrics count (the others computed the same)."""
        return self.tp_rank == 0 and self.cp_rank == 0

    @property
    def gradient_ranks(self) -> int:
        """The ranks DDP / FSDP2 average gradients over: the data- and context-parallel ones (a context
        rank's gradient is one part of its group's sum; tensor-parallel ranks hold different shards)."""
        return self.data_parallel * self.context_parallel

    @property
    def tp_mesh(self) -> DeviceMesh:
        return self._mesh()["tp"]

    @property
    def cp_group(self) -> dist.ProcessGroup:
        return self._mesh()["cp"].get_group()

    @property
    def shard_mesh(self) -> DeviceMesh | None:
        """The flattened dp x cp mesh FSDP2 shards over (size 1 when every rank is tensor- or
        context-parallel: the parameters are DTensors all the same); None without a mesh: every rank."""
        return None if self.mesh is None else self.mesh["dp", "cp"]._flatten("dp_cp")

    def _mesh(self) -> DeviceMesh:
        if self.mesh is None:
            raise ValueError("no device mesh: distributed.tensor_parallel and context_parallel are both 1")
        return self.mesh


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


def shard(
    module: nn.Module, model: nn.Module, mesh: DeviceMesh | None = None, *, forward_only: bool = False
) -> nn.Module:
    """FSDP2: shard each transformer block of ``model``, then ``module`` (the root that runs the forward), over
    ``mesh`` (None: every rank). ``forward_only`` (a model that never runs backward): the root's own
    parameters (embeddings, head, final norm) are resharded after each forward too, where FSDP2 keeps a
    root's unsharded for the backward that follows."""
    for block in _blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(module, mesh=mesh, reshard_after_forward=True if forward_only else None)
    return module


def reshard(module: nn.Module) -> None:
    """FSDP2 keeps a root's parameters unsharded after its forward, for the backward that follows: a forward
    outside training puts the sharded ones back with this (the optimizer takes what the module holds)."""
    if isinstance(module, FSDPModule):
        module.reshard()


def wrap_trainable(module: nn.Module, model: nn.Module, strategy: str, info: DistInfo) -> nn.Module:
    """The module the trainer calls: DDP-wrapped, FSDP2-sharded (over the dp x cp ranks of the mesh, if any),
    or as is for one process."""
    if not info.distributed:
        return module
    if strategy == "fsdp2":
        return shard(module, model, info.shard_mesh)
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


def clip_grad_norm(parameters: list[nn.Parameter], max_norm: float) -> float:
    """Clip the gradients of ``parameters`` to a total 2-norm of ``max_norm`` (inf: measure only); return the
    norm before clipping. The parameters may live on different meshes (tensor-parallel shards on the 2-D mesh,
    the other weights on the FSDP2 mesh alone), which ``torch.nn.utils.clip_grad_norm_`` cannot mix: each
    mesh's norm is taken whole, then they are combined."""
    by_mesh: dict[DeviceMesh | None, list[torch.Tensor]] = {}
    for p in parameters:
        if p.grad is not None:
            by_mesh.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p.grad)
    norms = []
    for grads in by_mesh.values():
        norm = torch.nn.utils.get_total_norm(grads)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if not norms:
        return 0.0
    total = norms[0].item() if len(norms) == 1 else torch.stack(norms).double().norm().item()
    scale = max_norm / (total + 1e-6)
    if scale < 1.0:  # also a NaN norm: the step is skipped anyway
        for grads in by_mesh.values():
            torch._foreach_mul_(grads, scale)
    return total
