"""Context parallelism's collectives: a row's keys and values gathered from its context ranks, and the
per-sequence log-probs summed over them (``preftune.data.context_split`` splits the rows; the attention over
the gathered row is ``preftune.modeling.attention``'s).

Both are autograd functions. Gathering: each rank's keys and values are used by every rank's queries, so the
backward sums every rank's gradient of a rank's keys to that rank (a reduce-scatter; gloo has none, so there
an all-reduce of the whole row, of which each rank keeps its part). Summing: the loss is computed alike on
every context rank from the summed log-probs, so each rank's part gets the summed log-probs' gradient as is.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from preftune.data.batch import ContextShard

REDUCE_SCATTER_BACKENDS = ("nccl", "xccl")
# torch 2.13 renames the single-tensor collectives (the old names warn); torch >= 2.6 has the old ones
ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class ContextGroup(NamedTuple):
    """What the attention of a context-parallel forward needs: the batch's shard and the ranks' group (None:
    the default group)."""

    shard: ContextShard
    group: ProcessGroup | None


class _Gather(torch.autograd.Function):
    """[...] on each of the group's ranks -> [ranks, ...] on every rank; backward: each rank's part summed."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group: ProcessGroup | None) -> Tensor:
        ctx.group = group
        out = tensor.new_empty(dist.get_world_size(group) * tensor.shape[0], *tensor.shape[1:])
        ALL_GATHER(out, tensor.contiguous(), group=group)  # the ranks' tensors along dim 0
        return out.unflatten(0, (-1, tensor.shape[0]))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.flatten(0, 1).contiguous()
        if dist.get_backend(ctx.group) in REDUCE_SCATTER_BACKENDS:
            out = grad.new_empty(grad.shape[0] // dist.get_world_size(ctx.group), *grad.shape[1:])
            REDUCE_SCATTER(out, grad, group=ctx.group)
            return out, None
        dist.all_reduce(grad, group=ctx.group)
        return grad.unflatten(0, (dist.get_world_size(ctx.group), -1))[dist.get_rank(ctx.group)], None


class _Sum(torch.autograd.Function):
    """The sum over the group's ranks; backward: the sum's gradient, as is, to each rank's part."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group: ProcessGroup | None) -> Tensor:
        out = tensor.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def gather_row(local: Tensor, context: ContextGroup) -> Tensor:
    """[R, heads, 2n, D] this rank's tokens (its two chunks of n) -> [R, heads, 2Cn, D] the whole rows, in
    row order, from the C ranks of the group."""
    shard = context.shard
    if dist.get_world_size(context.group) != shard.size:
        raise ValueError(
            f"the context group has {dist.get_world_size(context.group)} ranks, the batch was split for "
            f"{shard.size}"
        )
    gathered = _Gather.apply(local, context.group).unflatten(3, (2, shard.chunk_length))  # [C, R, h, 2, n, D]
    # rank k holds chunks k (front) and 2C - 1 - k (back): the fronts in rank order, then the backs reversed
    chunks = torch.cat([gathered[:, :, :, 0], gathered[:, :, :, 1].flip(0)])  # [2C, R, h, n, D]
    return chunks.permute(1, 2, 0, 3, 4).flatten(2, 3)


def sum_over_context(values: Tensor, context: ContextGroup) -> Tensor:
    """``values`` summed over the context ranks (each holds part of every sequence's tokens)."""
    return _Sum.apply(values, context.group)
