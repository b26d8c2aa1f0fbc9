"""Context parallelism's split of a micro-batch: each row's tokens shared out over C context ranks.

A row is padded to a multiple of 2C tokens and cut into 2C equal chunks; rank r holds chunk r and chunk
2C - 1 - r. Under causal attention a token's work grows with its offset, so pairing a front chunk with its
mirror from the back gives every rank the same work. Each rank keeps its tokens' positions (so rotary
embeddings see the unsplit row), the whole row's ``attention_blocks`` (its attention gathers the row's keys and
values, ``preftune.modeling.context_parallel``), and the trained tokens whose predicting hidden state it holds.
``MicroBatch``'s docstring works an example through token by token.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from preftune.data.batch import ContextShard, MicroBatch


def context_shard(row_length: int, rank: int, size: int) -> ContextShard:
    """Rank ``rank`` of ``size``'s shard of rows of ``row_length`` tokens."""
    if not 0 <= rank < size:
        raise ValueError(f"context rank {rank} is not in [0, {size})")
    return ContextShard(rank, size, -(-row_length // (2 * size)), row_length)


def local_offsets(shard: ContextShard) -> Tensor:
    """[2 * chunk_length] the row offsets of the tokens this rank holds, in its order."""
    n = shard.chunk_length
    return torch.cat([torch.arange(c * n, (c + 1) * n) for c in shard.chunks])


def split_for_context(batch: MicroBatch, rank: int, size: int, pad_id: int) -> MicroBatch:
    """Context rank ``rank`` of ``size``'s part of ``batch`` (rows padded with ``pad_id`` at position 0, then
    split); ``batch`` itself when ``size`` is 1. Needs ``attention_blocks`` (``preftune_varlen``): an
    explicit mask over the whole row cannot be split."""
    if size == 1:
        return batch
    if batch.attention_blocks is None or batch.attention_mask is not None:
        raise ValueError("context parallelism splits packed / shared-prompt rows under preftune_varlen only")
    length = batch.input_ids.shape[1]
    shard = context_shard(length, rank, size)
    extra = 2 * size * shard.chunk_length - length
    offsets = local_offsets(shard).to(batch.input_ids.device)

    def split(t: Tensor | None, value: int) -> Tensor | None:
        return None if t is None else F.pad(t, (0, extra), value=value)[:, offsets]

    row, offset = batch.hidden_index // length, batch.hidden_index % length
    chunk = offset // shard.chunk_length
    owner = torch.where(chunk < size, chunk, 2 * size - 1 - chunk)
    mine = owner == rank
    # the front chunk is local offsets 0 .. n - 1, the back one n .. 2n - 1
    local = offset - chunk * shard.chunk_length + torch.where(chunk < size, 0, shard.chunk_length)
    return replace(
        batch,
        input_ids=split(batch.input_ids, pad_id),
        position_ids=split(batch.position_ids, 0),
        token_weights=split(batch.token_weights, 0),
        hidden_index=(row * 2 * shard.chunk_length + local)[mine],
        target_ids=batch.target_ids[mine],
        sequence_index=batch.sequence_index[mine],
        context_shard=shard,
    )
