"""Segment-wise attention for packed and shared-prompt rows (``model.attn_implementation: preftune_varlen``).

A packed row holds several sequences; a mask over the whole row makes attention cost grow with the square of
the row and keeps SDPA off its fused causal kernel. Here attention runs per block instead, the way varlen
kernels do: each block is a span of queries that attend causally to themselves and, for a shared prompt's
rejected response, fully to a context span (the prompt) laid out earlier in the row. Each block is one
``scaled_dot_product_attention`` call on its own keys, so the work is the sum of the blocks' squares (causal,
or a bottom-right causal mask when there is a context or a sliding window). On CPU every call runs the flash
kernel; on CUDA the causal calls do, the masked ones the memory-efficient kernel (not measured here: no GPU).

The blocks come from the collate (``preftune.data.packing``) and reach every attention layer as the forward's
``attention_blocks`` keyword (transformers passes a model's extra keywords down to the attention function).
Some decoder layers (StableLM, Nemotron) call their attention without those keywords; ``carry_blocks`` hooks
every layer so the blocks it was given reach its attention all the same. Without blocks (padded micro-batches)
each row is one block: right padding under causal attention is exact. A block's mask depends on its shape
alone, so one forward's layers share it (``shared_masks``: autograd keeps one copy, not one per layer).

Under context parallelism (``context_parallel``: a ``ContextGroup``) a rank holds two chunks of each row
(``preftune.data.context_split``); ``context_attention`` gathers the row's keys and values from the context
ranks and cuts its chunks' queries at the block boundaries, each span attending as the rest of its block would.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface

from preftune.data.batch import Block
from preftune.data.visibility import RESPONSE, VARLEN, visible
from preftune.modeling.context_parallel import ContextGroup, gather_row


def visible_keys(num_context: int, num_queries: int, window: int | None, device: torch.device) -> Tensor:
    """Boolean [queries, context + queries] mask of one block: its context, then its queries (a response)."""
    offsets = torch.arange(num_context + num_queries, device=device)
    ids = (torch.zeros_like(offsets), (offsets >= num_context).long() * RESPONSE, offsets)
    query = [t[num_context:, None] for t in ids]
    key = [t[None, :] for t in ids]
    return visible(query, key, query[2], key[2], window)


def shared_mask(masks: dict, num_context: int, num_queries: int, window: int | None, query: Tensor) -> Tensor:
    """``visible_keys``'s mask as SDPA's additive one in the queries' dtype, from ``masks`` (one forward's, by
    shape and window) or made into it. SDPA turns a boolean mask into a new additive one at every call and
    keeps it for the backward, once per layer; an additive one it keeps as is, so the layers share one."""
    key = (num_context, num_queries, window, query.dtype, query.device)
    if key not in masks:
        visible = visible_keys(num_context, num_queries, window, query.device)
        masks[key] = torch.zeros(visible.shape, dtype=query.dtype, device=query.device).masked_fill_(
            ~visible, float("-inf")
        )
    return masks[key]


def block_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    num_context: int,
    *,
    groups: int,
    scaling: float | None,
    dropout: float,
    window: int | None,
    softcap: float | None,
    sinks: Tensor | None = None,
    shared_masks: dict | None = None,
) -> Tensor:
    """Attention of [B, H, Q, D] queries over [B, KV, C + Q, D] keys and values (the last Q are the
    queries' own tokens), causal and windowed as ``visible_keys`` says; returns [B, H, Q, D]. ``sinks``
    ([H] logits, gpt-oss) join every query's softmax as one more key that contributes no value.
    ``shared_masks``: one forward's masks, made once for all its layers (``shared_mask``)."""
    num_queries = query.shape[2]
    needs_mask = num_context > 0 or (window is not None and num_context + num_queries > window)
    fused = softcap is None and sinks is None
    if needs_mask and fused and shared_masks is not None:
        mask = shared_mask(shared_masks, num_context, num_queries, window, query)
    else:
        mask = visible_keys(num_context, num_queries, window, query.device) if needs_mask else None
    if fused:
        # CPU's flash kernel takes a mask and grouped heads together; CUDA's masked (memory-efficient) kernel
        # does not take grouped heads, so there the key/value heads are repeated rather than fall back to math.
        native_groups = mask is None or query.device.type == "cpu"
        if groups > 1 and not native_groups:
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        return F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=mask,
            is_causal=mask is None,
            dropout_p=dropout,
            scale=scaling,
            enable_gqa=groups > 1 and native_groups,
        )
    # Soft-capped logits (Gemma 2) and sinks have no fused kernel: the explicit form, one block at a time.
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = query @ key.transpose(-1, -2) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if mask is None:
        mask = visible_keys(0, num_queries, None, query.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        sink = sinks.to(scores.dtype).reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        scores = torch.cat([scores, sink], dim=-1)
    probs = scores.softmax(-1, dtype=torch.float32).to(query.dtype)
    if sinks is not None:
        probs = probs[..., :-1]
    return F.dropout(probs, p=dropout, training=dropout > 0) @ value


def varlen_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    s_aux: Tensor | None = None,
    attention_blocks: Sequence[Block] | None = None,
    context_parallel: ContextGroup | None = None,
    shared_masks: dict | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers attention function: [B, H, L, D] queries, [B, KV, L, D] keys/values -> [B, L, H, D].
    ``context_parallel``: the rows are split over context ranks (``context_attention``); ``shared_masks``:
    the forward's masks, shared by its layers (``shared_mask``)."""
    if attention_mask is not None or key.shape[2] != query.shape[2]:  # a KV cache: decode under SDPA instead
        raise ValueError(f"{VARLEN} takes attention_blocks, not an attention mask or a KV cache")
    if kwargs.get("output_attentions"):
        raise ValueError(f"{VARLEN} cannot return attention weights")
    options = {
        "groups": query.shape[1] // key.shape[1],
        "scaling": scaling,
        "dropout": dropout,
        "window": sliding_window,
        "softcap": softcap,
        "sinks": s_aux,
        "shared_masks": shared_masks,
    }
    if attention_blocks is None:  # padded rows: each row is one causal sequence
        return block_attention(query, key, value, 0, **options).transpose(1, 2), None
    if context_parallel is not None:
        return context_attention(query, key, value, attention_blocks, context_parallel, options), None
    length = query.shape[2]
    out = []
    for row in range(query.shape[0]):
        blocks, sizes, starts = _tiling(attention_blocks, row, length)
        qs, ks, vs = (t[row : row + 1].split(sizes, dim=2) for t in (query, key, value))
        pieces = []
        for i, (_, ctx_start, ctx_len, _, _) in enumerate(blocks):
            k, v = ks[i], vs[i]
            if ctx_len:  # the context is the start of an earlier block (a shared prompt)
                j = starts[ctx_start]
                k = torch.cat([ks[j][:, :, :ctx_len], k], dim=2)
                v = torch.cat([vs[j][:, :, :ctx_len], v], dim=2)
            pieces.append(block_attention(qs[i], k, v, ctx_len, **options))
        pieces.append(query.new_zeros(1, query.shape[1], sizes[-1], value.shape[-1]))
        out.append(torch.cat(pieces, dim=2))
    return torch.cat(out).transpose(1, 2), None


def _tiling(blocks: Sequence[Block], row: int, length: int) -> tuple[list[Block], list[int], dict[int, int]]:
    """Row ``row``'s blocks, the sizes that split the row at their boundaries (the last: the padding after
    the last block) and each block's index by its start."""
    mine = [block for block in blocks if block[0] == row]
    # Split (not slice) the row at the block boundaries: the backward of a split is one concatenation,
    # where each slice's backward would write a row-sized tensor of zeros.
    sizes, starts, offset = [], {}, 0
    for i, (_, _, _, q_start, q_len) in enumerate(mine):
        if q_start != offset:
            raise ValueError(f"{VARLEN}: the blocks of row {row} must tile it in order from offset 0")
        sizes.append(q_len)
        starts[q_start] = i
        offset += q_len
    sizes.append(length - offset)  # padding after the last block: it attends to nothing (zeros)
    return mine, sizes, starts


def context_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    blocks: Sequence[Block],
    context: ContextGroup,
    options: dict,
) -> Tensor:
    """Attention of this rank's queries ([R, H, 2n, D]: its two chunks of n tokens, ``ContextShard``) over
    the whole rows' keys and values, gathered from the context ranks; returns [R, 2n, H, D].

    Each chunk's queries are cut at the block boundaries; the span of block b from offset s to e attends,
    as ``block_attention`` does for a whole block, to b's context then b's own keys up to e, its keys before
    s taken as more context: the same rule (``visible``, windows, soft-cap, sinks) as one process."""
    n = context.shard.chunk_length
    keys, values = gather_row(key, context), gather_row(value, context)
    out = []
    for row in range(query.shape[0]):
        blocks_r, sizes, starts = _tiling(blocks, row, keys.shape[2])
        ks, vs = keys[row : row + 1].split(sizes, dim=2), values[row : row + 1].split(sizes, dim=2)
        pieces = []
        for local, chunk in zip(query[row : row + 1].split(n, dim=2), context.shard.chunks, strict=True):
            lo, hi = chunk * n, (chunk + 1) * n
            spans = [
                (i, max(lo, q_start), min(hi, q_start + q_len))
                for i, (_, _, _, q_start, q_len) in enumerate(blocks_r)
                if q_start < hi and q_start + q_len > lo
            ]
            covered = sum(e - s for _, s, e in spans)
            queries = local.split([e - s for _, s, e in spans] + [n - covered], dim=2)
            for (i, s, e), q in zip(spans, queries[:-1], strict=True):
                _, ctx_start, ctx_len, q_start, _ = blocks_r[i]
                k, v = ks[i][:, :, : e - q_start], vs[i][:, :, : e - q_start]
                if ctx_len:
                    j = starts[ctx_start]
                    k = torch.cat([ks[j][:, :, :ctx_len], k], dim=2)
                    v = torch.cat([vs[j][:, :, :ctx_len], v], dim=2)
                pieces.append(block_attention(q, k, v, ctx_len + s - q_start, **options))
            if covered < n:  # padding after the last block
                pieces.append(query.new_zeros(1, query.shape[1], n - covered, value.shape[-1]))
        out.append(torch.cat(pieces, dim=2))
    return torch.cat(out).transpose(1, 2)


CARRIED = ("attention_blocks", "context_parallel", "shared_masks")  # the forward's keywords for the attention


def _remember_blocks(layer: nn.Module, args: tuple, kwargs: dict) -> None:
    """Decoder layer pre-hook: hand this call's ``CARRIED`` keywords (those given) to its attention module."""
    layer.self_attn.preftune_blocks = {key: kwargs[key] for key in CARRIED if kwargs.get(key) is not None}


def _pass_blocks(attention: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Attention pre-hook: add the layer's ``CARRIED`` keywords when the layer did not pass them on."""
    carried = {
        k: v for k, v in (getattr(attention, "preftune_blocks", None) or {}).items() if k not in kwargs
    }
    return (args, {**kwargs, **carried}) if carried else None


def carry_blocks(model: nn.Module) -> None:
    """Make every decoder layer's ``CARRIED`` keywords (the blocks, the context group, the shared masks)
    reach its attention (``self_attn``), also where the layer's forward drops its extra keywords. Idempotent;
    the hooks hold no module reference, so a deep copy of the model (a frozen reference) carries its own. The per-call state is overwritten on
    every layer call, the recomputation of activation checkpointing included."""
    for layer in model.modules():
        attention = getattr(layer, "self_attn", None)
        if not isinstance(attention, nn.Module) or hasattr(attention, "preftune_blocks"):
            continue
        attention.preftune_blocks = None
        layer.register_forward_pre_hook(_remember_blocks, with_kwargs=True)
        attention.register_forward_pre_hook(_pass_blocks, with_kwargs=True)


AttentionInterface.register(VARLEN, varlen_attention_forward)
