"""Packed and shared-prompt micro-batches (``data.packing``, ``data.share_prompt``).

Packing lays several preference pairs end to end in one row, up to a token budget, with no padding between
sequences; a pair's chosen and rejected always share a row. A shared prompt lays a pair out once as prompt,
chosen, rejected: rejected attends to the prompt and to itself, never to chosen, and its positions continue
from the prompt's end. Online, a prompt's K sampled responses are one group laid out the same way (prompt,
response 1 .. response K), each computed once whatever the number of pairs drawn among them. Either way every response token sees exactly the context, at exactly the positions, it
would see in its own unpadded sequence, so the log-probs are those of the padded layout.

Isolation is either segment-wise attention (``preftune_varlen``, ``preftune.modeling.attention``: one fused-kernel call per
sequence, so the cost does not grow with the row) or an explicit attention mask over the whole row
(transformers applies a prepared 4-D mask as is) built from three
per-token ids: the segment (a token attends only within its segment), the branch (0: seen by the whole segment;
1 + j: response j, a pair's chosen or rejected; a response never sees another response) and the position (a sliding window is a
distance in positions, as the unpacked model measures it). It takes the form the attention takes: a boolean
[R, 1, L, L] mask for sdpa, an additive float one for eager, a ``BlockMask`` for flex_attention, and a dict of
them by layer type for models that mix full and sliding-window layers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask
from transformers import PretrainedConfig

from preftune.data.batch import Block, MicroBatch, item_responses, pad_right, pair_length
from preftune.data.context_split import split_for_context
from preftune.data.visibility import CONTEXT, RESPONSE, VARLEN, check_packed_attention, visible
from preftune.data.windows import mask_windows

FLEX_BLOCK_SIZE = 128


class RowIds(NamedTuple):
    """[R, L] per-token ids of a micro-batch's rows that the explicit masks are built from (see ``visible``)."""

    segment: Tensor
    """The segment (a token attends only within its segment; padding: -1)."""
    branch: Tensor
    """CONTEXT (seen by the whole segment) or RESPONSE + j (a response never sees another one)."""
    position: Tensor
    """The position in the token's own sequence (a sliding window is a distance in positions)."""


def dense_mask(ids: RowIds, window: int | None) -> Tensor:
    """Boolean [R, 1, L, L] mask (True: attend) from the [R, L] (segment, branch, position) ids."""
    idx = torch.arange(ids[0].shape[1], device=ids[0].device)
    query, key = [t[:, :, None] for t in ids], [t[:, None, :] for t in ids]
    return visible(query, key, idx[:, None], idx[None, :], window)[:, None]


def block_mask(ids: RowIds, window: int | None) -> BlockMask:
    """flex_attention ``BlockMask`` from the [R, L] (segment, branch, position) ids."""

    def mask_mod(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return visible([t[b, q] for t in ids], [t[b, k] for t in ids], q, k, window)

    rows, length = ids[0].shape
    return create_block_mask(
        mask_mod, rows, None, length, length, device=ids[0].device, BLOCK_SIZE=FLEX_BLOCK_SIZE
    )


def attention_mask(
    ids: RowIds, window: int | None, attn_implementation: str, dtype: torch.dtype
) -> Tensor | BlockMask:
    """The mask in the form ``attn_implementation`` takes (eager: additive, 0 or the dtype's minimum)."""
    if attn_implementation == "flex_attention":
        return block_mask(ids, window)
    mask = dense_mask(ids, window)
    if attn_implementation == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
            ~mask, torch.finfo(dtype).min
        )
    return mask


def first_fit_decreasing(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Item indices in bins of at most ``budget``: longest item first, each into the first bin with room."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(budget - lengths[i])
    return bins


class _Row:
    """One row being filled: token ids, their position, segment and branch ids, and its attention blocks
    (``Block`` without the row index)."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.pos: list[int] = []
        self.seg: list[int] = []
        self.branch: list[int] = []
        self.copies: list[int] = []
        self.blocks: list[tuple[int, int, int, int]] = []
        self.segments = 0

    def new_segment(self) -> int:
        """A segment id not used yet in this row."""
        self.segments += 1
        return self.segments - 1

    def put(self, tokens: list[int], first_pos: int, segment: int, branch: int, copies: int = 1) -> int:
        """Append ``tokens`` at positions from ``first_pos``, standing for ``copies`` tokens of the padded
        layout (a shared prompt: 2); return the row offset of the first."""
        at = len(self.ids)
        self.ids.extend(tokens)
        self.pos.extend(range(first_pos, first_pos + len(tokens)))
        self.seg.extend([segment] * len(tokens))
        self.branch.extend([branch] * len(tokens))
        self.copies.extend([copies] * len(tokens))
        return at


class _Targets:
    """The trained tokens of a micro-batch as they are laid out: which hidden state predicts each (row and
    row offset), the token, and its sequence."""

    def __init__(self) -> None:
        self.row: list[int] = []
        self.offset: list[int] = []
        self.token: list[int] = []
        self.sequence: list[int] = []

    def add(self, row: int, sequence: int, response: list[int], at: int, first_hidden: int | None) -> None:
        """The response sits at row offset ``at``; its first token is predicted by the prompt's last token
        (``first_hidden``), or by nothing when the prompt is empty (as in the padded layout)."""
        offsets = [first_hidden, *range(at, at + len(response) - 1)]
        skip = 1 if first_hidden is None else 0
        self.offset.extend(offsets[skip:])
        self.token.extend(response[skip:])
        self.row.extend([row] * (len(response) - skip))
        self.sequence.extend([sequence] * (len(response) - skip))


def _put_group(
    row: _Row,
    targets: _Targets,
    r: int,
    prompt: list[int],
    responses: list[list[int]],
    sequences: list[int],
    *,
    share_prompt: bool,
) -> None:
    """Lay one prompt and its responses out in ``row`` (row index ``r``), response j as sequence
    ``sequences[j]``: with a shared prompt, the prompt once then each response (attending to the prompt and to
    itself, never to another response, at positions continuing from the prompt's end); else each
    prompt+response as a sequence of its own. A pair is the group of its chosen and rejected responses."""
    n = len(prompt)
    if share_prompt:
        segment = row.new_segment()
        start = row.put(prompt, 0, segment, CONTEXT, copies=len(responses))
        last_prompt = start + n - 1 if n else None
        for j, (sequence, response) in enumerate(zip(sequences, responses, strict=True)):
            at = row.put(response, n, segment, RESPONSE + j)
            targets.add(r, sequence, response, at, last_prompt)
            # the first response's block holds the prompt too; a later one takes the prompt as its context
            row.blocks.append(
                (start, 0, start, n + len(response)) if j == 0 else (start, n, at, len(response))
            )
        return
    for sequence, response in zip(sequences, responses, strict=True):
        start = row.put(prompt + response, 0, row.new_segment(), CONTEXT)
        targets.add(r, sequence, response, start + n, start + n - 1 if n else None)
        row.blocks.append((start, 0, start, n + len(response)))


def _pairs_of(items: list[dict[str, Any]]) -> tuple[list[list[int]], dict[str, Any]]:
    """Each item's sequence numbers and the ``MicroBatch`` fields of its pairs. Pairs: pair i is sequences
    i and P + i. Groups (items with ``responses``, ``pairs`` of response indices, ``rewards`` one per
    response, ``index``): their responses numbered in order, each pair referring to two of them."""
    if "responses" not in items[0]:
        p = len(items)
        return [[i, p + i] for i in range(p)], {
            "chosen_rewards": [pair["chosen_reward"] for pair in items],
            "rejected_rewards": [pair["rejected_reward"] for pair in items],
            "indices": [pair["index"] for pair in items],
        }
    sequences: list[list[int]] = []
    chosen, rejected = [], []
    fields: dict[str, Any] = {"chosen_rewards": [], "rejected_rewards": [], "indices": []}
    for group in items:
        first = sum(len(s) for s in sequences)
        sequences.append(list(range(first, first + len(group["responses"]))))
        for c, r in group["pairs"]:
            chosen.append(first + c)
            rejected.append(first + r)
            fields["chosen_rewards"].append(group["rewards"][c])
            fields["rejected_rewards"].append(group["rewards"][r])
            fields["indices"].append(group["index"])
    fields["pair_sequences"] = torch.tensor([chosen, rejected], dtype=torch.long).view(2, -1)
    fields["num_sequences"] = sum(len(s) for s in sequences)
    return sequences, fields


def group_by_prompt(pairs: Sequence[dict[str, Any]], max_tokens: int, *, share_prompt: bool) -> list[dict]:
    """Online pairs (each with ``completion_keys``: (prompt index, completion) per response) as K-completion
    groups: each prompt's distinct responses once, its pairs referring to them by index. A group that would
    take more than ``max_tokens`` is split: the pair that does not fit starts the prompt's next group (a pair
    alone always fits a row)."""
    layout = "shared" if share_prompt else "packed"
    out: list[dict] = []
    current: dict[int, dict] = {}  # prompt index -> its group being filled
    for pair in pairs:
        keys = pair["completion_keys"]
        sides = [(pair["chosen_ids"], pair["chosen_reward"]), (pair["rejected_ids"], pair["rejected_reward"])]
        group = current.get(keys[0][0])
        if group is not None:
            new = [ids for key, (ids, _) in zip(keys, sides, strict=True) if key not in group["keys"]]
            grown = {"prompt_ids": pair["prompt_ids"], "responses": group["responses"] + new}
        if group is None or pair_length(grown, layout) > max_tokens:
            group = {"prompt_ids": pair["prompt_ids"], "responses": [], "rewards": [], "pairs": [],
                     "keys": {}, "index": keys[0][0]}  # fmt: skip
            current[keys[0][0]] = group
            out.append(group)
        for key, (ids, reward) in zip(keys, sides, strict=True):
            if key not in group["keys"]:
                group["keys"][key] = len(group["responses"])
                group["responses"].append(ids)
                group["rewards"].append(reward)
        group["pairs"].append((group["keys"][keys[0]], group["keys"][keys[1]]))
    return out


def layout_rows(
    rows: Sequence[Sequence[dict[str, Any]]],
    *,
    eos_id: int,
    share_prompt: bool,
    shape: tuple[int, int] | None = None,
) -> tuple[MicroBatch, RowIds]:
    """Lay rows of pairs (or of K-completion groups) out as one ``MicroBatch`` (its ``attention_blocks``
    set, no mask) and the ids its explicit masks are built from.

    Pair i (in row order) is sequence i (chosen) and P + i (rejected); a group's responses are sequences in
    row order and its pairs refer to them (``MicroBatch.pair_sequences``), so a response in several pairs is
    computed once. Padding (eos) ends each row in a segment of its own (-1), so no real token sees it;
    ``shape`` pads to exactly [rows, length] (default: the rows given, the longest's length).
    """
    items = [item for row in rows for item in row]
    sequences, pair_fields = _pairs_of(items)
    filled, targets = [_Row() for _ in rows], _Targets()
    i = 0
    for r, items_in_row in enumerate(rows):
        for item in items_in_row:
            responses = item_responses(item)
            _put_group(
                filled[r], targets, r, item["prompt_ids"], responses, sequences[i], share_prompt=share_prompt
            )
            i += 1
    real = [len(row.ids) for row in filled]
    num_rows, length = shape or (len(filled), max(real))
    if num_rows < len(filled) or length < max(real):
        raise ValueError(f"{len(filled)} rows of up to {max(real)} tokens do not fit in shape {shape}")
    filled += [_Row() for _ in range(num_rows - len(filled))]
    position_ids = pad_right([row.pos for row in filled], length, 0)
    batch = MicroBatch(
        input_ids=pad_right([row.ids for row in filled], length, eos_id),
        position_ids=position_ids,
        attention_mask=None,
        hidden_index=torch.tensor(targets.row, dtype=torch.long) * length
        + torch.tensor(targets.offset, dtype=torch.long),
        target_ids=torch.tensor(targets.token, dtype=torch.long),
        sequence_index=torch.tensor(targets.sequence, dtype=torch.long),
        chosen_rewards=torch.tensor(pair_fields["chosen_rewards"], dtype=torch.float32),
        rejected_rewards=torch.tensor(pair_fields["rejected_rewards"], dtype=torch.float32),
        indices=torch.tensor(pair_fields["indices"], dtype=torch.long),
        num_tokens=sum(real),
        num_pairs=len(pair_fields["indices"]),
        token_weights=pad_right([row.copies for row in filled], length, 0),
        attention_blocks=tuple(Block(r, *block) for r, row in enumerate(filled) for block in row.blocks),
        pair_sequences=pair_fields.get("pair_sequences"),
        num_sequences=pair_fields.get("num_sequences"),
    )
    ids = RowIds(
        segment=pad_right([row.seg for row in filled], length, -1),
        branch=pad_right([row.branch for row in filled], length, CONTEXT),
        position=position_ids,
    )
    return batch, ids


def build_packed_collate(
    *,
    eos_id: int,
    model_config: PretrainedConfig,
    attn_implementation: str,
    pack: bool,
    share_prompt: bool,
    max_tokens_per_row: int,
    rows_per_micro_batch: int = 1,
    device: torch.device | str = "cpu",
    context: tuple[int, int] = (0, 1),
) -> Callable[[Sequence[dict[str, Any]]], list[MicroBatch]]:
    """A collate turning a rank's share of a global batch into packed and/or shared-prompt micro-batches.

    ``pack``: pairs go into rows of at most ``max_tokens_per_row`` real tokens by first-fit-decreasing, and
    ``rows_per_micro_batch`` rows make a micro-batch (laid end to end as one row under ``preftune_varlen``, which
    needs no padding); otherwise each row holds one pair (``share_prompt``
    must then be set: the plain layout is ``data.padded_micro_batches``). Every pair of the global batch
    appears in exactly one micro-batch. The micro-batches are built on ``device`` (the masks included: the
    model cannot move a ``BlockMask`` or a per-layer-type dict): ``MicroBatch``es with ``attention_blocks``
    under ``preftune_varlen``, else with an ``attention_mask``. ``context`` (rank, ranks): context
    parallelism, each micro-batch is this context rank's part of it (``preftune.data.context_split``).
    """
    _check_layout(pack, share_prompt, attn_implementation)
    if context[1] > 1 and attn_implementation != VARLEN:
        raise ValueError(f"context parallelism splits rows under {VARLEN} only, not {attn_implementation}")
    lay_out = partial(
        _micro_batch,
        eos_id=eos_id,
        share_prompt=share_prompt,
        attn_implementation=attn_implementation,
        windows=mask_windows(model_config),
        dtype=model_config.dtype,
        shape=_flex_shape(attn_implementation, rows_per_micro_batch, max_tokens_per_row),
        device=device,
        context=context,
    )

    def collate(pairs: Sequence[dict[str, Any]]) -> list[MicroBatch]:
        rows = _rows(pairs, pack=pack, share_prompt=share_prompt, max_tokens_per_row=max_tokens_per_row)
        return [
            lay_out(rows[s : s + rows_per_micro_batch]) for s in range(0, len(rows), rows_per_micro_batch)
        ]

    return collate


def _check_layout(pack: bool, share_prompt: bool, attn_implementation: str) -> None:
    """A packed or shared-prompt layout, under an attention that isolates its sequences."""
    if not (pack or share_prompt):
        raise ValueError(
            "build_packed_collate needs pack or share_prompt; the plain layout is padded_micro_batches"
        )
    check_packed_attention(attn_implementation)


def _flex_shape(attn_implementation: str, rows: int, max_tokens_per_row: int) -> tuple[int, int] | None:
    """One shape for every flex micro-batch: each new shape recompiles flex_attention, and the dynamic-shape
    CPU kernel of torch 2.13's inductor fails to compile. None: each micro-batch its own shape."""
    if attn_implementation != "flex_attention":
        return None
    return rows, -(-max_tokens_per_row // FLEX_BLOCK_SIZE) * FLEX_BLOCK_SIZE


def _rows(
    pairs: Sequence[dict[str, Any]], *, pack: bool, share_prompt: bool, max_tokens_per_row: int
) -> list[list[dict[str, Any]]]:
    """The pairs in rows: packed first-fit-decreasing (``pack``), else one pair a row."""
    lengths = [pair_length(ex, "shared" if share_prompt else "packed") for ex in pairs]
    for ex, n in zip(pairs, lengths, strict=True):
        if n > max_tokens_per_row:
            raise ValueError(
                f"pair {ex['index']} takes {n} tokens, more than a row's {max_tokens_per_row} "
                f"(raise data.pack_length)"
            )
    rows = first_fit_decreasing(lengths, max_tokens_per_row) if pack else [[i] for i in range(len(pairs))]
    return [[pairs[i] for i in row] for row in rows]


def _micro_batch(
    rows: list[list[dict[str, Any]]],
    *,
    eos_id: int,
    share_prompt: bool,
    attn_implementation: str,
    windows: int | dict[str, int | None] | None,
    dtype: torch.dtype,
    shape: tuple[int, int] | None,
    device: torch.device | str,
    context: tuple[int, int],
) -> MicroBatch:
    """One micro-batch of ``rows`` on ``device``: end to end as one row under ``preftune_varlen`` (no mask,
    no padding; ``context`` rank's part of it), else the rows with the attention mask of each layer type's
    ``windows``."""
    if attn_implementation == VARLEN:
        batch, _ = layout_rows([[ex for row in rows for ex in row]], eos_id=eos_id, share_prompt=share_prompt)
        return split_for_context(batch, *context, pad_id=eos_id).to(device)
    batch, ids = layout_rows(rows, eos_id=eos_id, share_prompt=share_prompt, shape=shape)
    ids = RowIds(*(t.to(device) for t in ids))
    mask = (
        {t: attention_mask(ids, w, attn_implementation, dtype) for t, w in windows.items()}
        if isinstance(windows, dict)
        else attention_mask(ids, windows, attn_implementation, dtype)
    )
    return replace(batch.to(device), attention_mask=mask, attention_blocks=None)


class DPOPackedDataset(torch.utils.data.Dataset):
    """Preference pairs trained packed and/or with a shared prompt (NeMo Aligner's name for it).

    Indexes like ``dataset``; ``global_collate_fn`` (``build_packed_collate`` for ``model_config`` and its
    attention implementation) turns a rank's share of a global batch into packed micro-batches: give it to
    ``DPOTrainer`` as ``collate_fn``. Packing happens inside each global batch, so every optimizer step sees
    exactly the pairs it would see unpacked.
    """

    def __init__(
        self,
        dataset: Any,
        model_config: PretrainedConfig,
        *,
        eos_id: int,
        pack_length: int,
        pack: bool = True,
        share_prompt: bool = False,
        rows_per_micro_batch: int = 1,
        device: torch.device | str = "cpu",
        context: tuple[int, int] = (0, 1),
    ):
        self.dataset = dataset
        self.global_collate_fn = build_packed_collate(
            eos_id=eos_id,
            model_config=model_config,
            attn_implementation=model_config._attn_implementation,
            pack=pack,
            share_prompt=share_prompt,
            max_tokens_per_row=pack_length,
            rows_per_micro_batch=rows_per_micro_batch,
            device=device,
            context=context,
        )

    @property
    def fingerprint(self) -> str:
        """The wrapped pairs' fingerprint (the reference cache is keyed by the pairs, not their layout)."""
        return self.dataset.fingerprint

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.dataset[index]
