"""``MicroBatch``: the one batch type every layout (padded, packed, shared prompt) is turned into, and the
padded collate (NeMo Aligner's ``dpo_custom_collate``) with its length-grouped micro-batches."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor


class ContextShard(NamedTuple):
    """Context parallelism: the part of each row one of ``size`` context ranks holds
    (``preftune.data.context_split``). The row, padded to ``2 * size * chunk_length`` tokens, is cut into
    ``2 * size`` chunks of ``chunk_length``; rank r holds chunk r then chunk ``2 * size - 1 - r`` (a front
    chunk and its mirror from the back, so every rank has the same share of causal attention's work)."""

    rank: int
    size: int
    chunk_length: int
    row_length: int
    """The unsplit row's tokens (before padding to a multiple of ``2 * size``)."""

    @property
    def chunks(self) -> tuple[int, int]:
        """The indices of the two chunks this rank holds, in the order its tokens lay them out."""
        return self.rank, 2 * self.size - 1 - self.rank


class Block(NamedTuple):
    """A span of one row that attends as one sequence (``preftune_varlen``): the queries at
    ``query_start .. query_start + query_length`` attend causally to themselves and fully to a context span
    (a shared prompt, laid out earlier in the row) of ``context_length`` tokens at ``context_start``. The
    keys are the context then the queries, at positions 0 .. context + queries - 1."""

    row: int
    context_start: int
    context_length: int
    query_start: int
    query_length: int


@dataclass
class MicroBatch:
    """One forward's worth of P preference pairs, laid out as flat rows of tokens.

    The model runs on ``input_ids``/``position_ids``/``attention_mask`` (or ``attention_blocks``); then only the
    hidden states that predict a response token go through the lm-head: trained token n is ``target_ids[n]``,
    predicted by the hidden state at flat position ``hidden_index[n]`` of the [R * L] rows, and belongs to
    sequence ``sequence_index[n]`` (pair i's chosen response is sequence i, its rejected one P + i; with
    K-completion groups, ``pair_sequences`` says which of the ``num_sequences`` responses each pair compares).

    Two pairs, A = (prompt [5 6], chosen [7 E], rejected [8 9 E]) and B = (prompt [5], chosen [4 E],
    rejected [3 E]), E the EOS id 2 (also the padding):

    Padded (``padded_micro_batches``: chosen rows then rejected rows, right-padded, no mask needed)::

        input_ids      [[5 6 7 E E]      A chosen      position_ids  [[0 1 2 3 4]
                        [5 4 E E E]      B chosen                     [0 1 2 3 4] ...]
                        [5 6 8 9 E]      A rejected
                        [5 3 E E E]]     B rejected
        hidden_index   [1 2  5 6  11 12 13  15 16]
        target_ids     [7 E  4 E  8  9  E   3  E ]
        sequence_index [0 0  1 1  2  2  2   3  3 ]

    Packed (``preftune.data.packing``, ``preftune_varlen``: one row, each sequence its own block)::

        input_ids      [[5 6 7 E  5 6 8 9 E  5 4 E  5 3 E]]
        position_ids   [[0 1 2 3  0 1 2 3 4  0 1 2  0 1 2]]
        attention_blocks  (0,0,0,0,4) (0,4,0,4,5) (0,9,0,9,3) (0,12,0,12,3)   (no context)
        hidden_index   [1 2  5 6 7  9 10  12 13]
        target_ids     [7 E  8 9 E  4 E   3  E ]
        sequence_index [0 0  2 2 2  1 1   3  3 ]

    Either way the per-sequence sums of the targets' log-probs are the same (tests compare them to 1e-5).

    Context parallelism (``preftune.data.context_split``) splits a packed row over C ranks. The packed row
    above, C = 2: 15 tokens padded (E, position 0) to 16, cut into 4 chunks of 4; rank 0 holds chunks 0 and 3
    (offsets 0-3 and 12-15), rank 1 chunks 1 and 2 (offsets 4-11). Each keeps the tokens it predicts from::

        rank 0  input_ids [[5 6 7 E  5 3 E E]]     rank 1  input_ids [[5 6 8 9  E 5 4 E]]
                position_ids [[0 1 2 3  0 1 2 0]]          position_ids [[0 1 2 3  4 0 1 2]]
                hidden_index   [1 2  4 5]                   hidden_index   [1 2 3  5 6]
                target_ids     [7 E  3 E]                   target_ids     [8 9 E  4 E]
                sequence_index [0 0  3 3]                   sequence_index [2 2 2  1 1]
                attention_blocks: the whole row's, on both; context_shard (0, 2, 4, 15) / (1, 2, 4, 15)

    Each rank's per-sequence sums are partial; summed over the ranks they are the unsplit row's.

    K-completion groups (``preftune.data.packing``, online training): one prompt's K responses share its
    prompt, each response a sequence of its own computed once; the pairs refer to them by sequence. Prompt [5],
    responses [4 E], [3 E], [6 E] with pairs (0, 2) and (1, 2), shared prompt::

        input_ids      [[5 4 E 3 E 6 E]]
        position_ids   [[0 1 2 1 2 1 2]]
        attention_blocks  (0,0,0,0,3) (0,0,1,3,2) (0,0,1,5,2)
        hidden_index   [0 1  0 3  0 5]
        target_ids     [4 E  3 E  6 E]
        sequence_index [0 0  1 1  2 2]
        pair_sequences [[0 1]          chosen of each pair
                        [2 2]]         rejected of each pair
    """

    input_ids: Tensor
    """[R, L] token ids (padding: EOS)."""
    position_ids: Tensor
    """[R, L] each token's position in its own sequence."""
    attention_mask: Any
    """None (causal attention alone suffices), or what the model's attention takes: a [R, 1, L, L] boolean or
    additive mask, a dict of them by layer type, or a flex-attention ``BlockMask``."""
    hidden_index: Tensor
    """[N] flat index into the [R * L] hidden states of the state that predicts trained token n."""
    target_ids: Tensor
    """[N] the trained (response) tokens."""
    sequence_index: Tensor
    """[N] the sequence token n belongs to, in [0, 2P): chosen of pair i is i, its rejected P + i."""
    chosen_rewards: Tensor
    """[P] ground-truth rewards of the chosen responses (float32)."""
    rejected_rewards: Tensor
    """[P] ground-truth rewards of the rejected responses (float32)."""
    indices: Tensor
    """[P] the pairs' dataset indices (-1: not from a dataset)."""
    num_tokens: int
    """Real (non-padding) tokens in the rows."""
    num_pairs: int
    """P, the pairs in this micro-batch."""
    attention_blocks: tuple[Block, ...] | None = None
    """``preftune_varlen`` only: the blocks that tile each row (None: each row is one causal sequence)."""
    ref_logps: Tensor | None = None
    """[2P] cached reference log-probs (chosen of every pair, then rejected), with ``reference.mode:
    precompute``."""
    token_weights: Tensor | None = None
    """[R, L] how many tokens of the padded layout each token stands for: 1 per real token, K per shared-prompt
    token (it serves the K responses after it), 0 for padding. A mixture-of-experts router's balancing loss
    weights its tokens by it, so every layout balances the padded layout's tokens."""
    pair_sequences: Tensor | None = None
    """[2, P] K-completion groups: the sequences of each pair's chosen (row 0) and rejected (row 1) response
    (None: pair i is sequences i and P + i)."""
    num_sequences: int | None = None
    """The sequences laid out (None: 2P)."""
    context_shard: ContextShard | None = None
    """Context parallelism: which chunks of each row this rank holds (``input_ids``, ``position_ids``,
    ``token_weights`` and the trained tokens are this rank's; ``attention_blocks`` the whole row's). None: the
    whole rows."""

    def sequence_count(self) -> int:
        """The sequences the per-sequence log-probs are summed into."""
        return 2 * self.num_pairs if self.num_sequences is None else self.num_sequences

    def to(self, device: torch.device | str) -> MicroBatch:
        """The batch with its tensors on ``device`` (a prepared mask is built on the device already)."""
        moved = {
            f.name: value.to(device, non_blocking=True)
            for f in fields(self)
            if isinstance(value := getattr(self, f.name), Tensor)
        }
        return replace(self, **moved)


def as_micro_batch(batch: MicroBatch | Mapping[str, Tensor]) -> MicroBatch:
    """``batch`` itself, or the padded micro-batch of a ``dpo_custom_collate`` dict."""
    return batch if isinstance(batch, MicroBatch) else micro_batch_from_padded(batch)


def pad_right(seqs: Sequence[Sequence[int]], length: int, value: int) -> Tensor:
    """[len(seqs), length] long tensor: each sequence followed by ``value`` up to ``length``."""
    return torch.tensor([list(s) + [value] * (length - len(s)) for s in seqs], dtype=torch.long)


def pair_length(pair: Mapping[str, Any], layout: Literal["padded", "packed", "shared"]) -> int:
    """Tokens a pair (or a group of K responses) takes: ``padded``, the row length it needs (prompt + the
    longest response); ``packed``, its room in a packed row (the prompt once per response, every response);
    ``shared``, with the prompt once."""
    prompt, responses = len(pair["prompt_ids"]), [len(r) for r in item_responses(pair)]
    if layout == "padded":
        return prompt + max(responses)
    return (1 if layout == "shared" else len(responses)) * prompt + sum(responses)


def item_responses(item: Mapping[str, Any]) -> list[list[int]]:
    """The responses of a laid-out item: a group's ``responses``, or a pair's chosen and rejected."""
    return item["responses"] if "responses" in item else [item["chosen_ids"], item["rejected_ids"]]


def dpo_custom_collate(
    batch: Sequence[dict[str, Any]], eos_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, Tensor]:
    """Right-pad prompt+chosen and prompt+rejected of a micro-batch to one length (NeMo Aligner's collate).

    Returns ``chosen``, ``rejected`` ([B, T] token ids, padded with ``eos_id``), ``chosen_length``,
    ``rejected_length`` ([B] real lengths), ``chosen_labels``, ``rejected_labels`` ([B, T], -100 on the
    prompt and the padding), ``attention_mask`` and ``position_ids`` ([2B, T]: chosen rows then rejected
    rows, the order of the single policy forward), ``chosen_rewards``, ``rejected_rewards`` ([B]),
    ``indices`` ([B] dataset indices) and ``num_tokens`` (real tokens in the batch).
    ``micro_batch_from_padded`` turns it into a ``MicroBatch``.
    """
    chosen = [ex["prompt_ids"] + ex["chosen_ids"] for ex in batch]
    rejected = [ex["prompt_ids"] + ex["rejected_ids"] for ex in batch]
    length = max(len(s) for s in chosen + rejected)
    if pad_to_multiple_of:
        length = math.ceil(length / pad_to_multiple_of) * pad_to_multiple_of

    def labels(seqs: list[list[int]]) -> Tensor:
        masked = [
            [-100] * len(ex["prompt_ids"]) + s[len(ex["prompt_ids"]) :]
            for ex, s in zip(batch, seqs, strict=True)
        ]
        return pad_right(masked, length, -100)

    lengths = torch.tensor([len(s) for s in chosen + rejected])
    positions = torch.arange(length)
    return {
        "chosen": pad_right(chosen, length, eos_id),
        "rejected": pad_right(rejected, length, eos_id),
        "chosen_length": lengths[: len(batch)],
        "rejected_length": lengths[len(batch) :],
        "chosen_labels": labels(chosen),
        "rejected_labels": labels(rejected),
        "attention_mask": (positions[None, :] < lengths[:, None]).long(),
        "position_ids": positions.expand(len(lengths), length).clone(),
        "chosen_rewards": torch.tensor([ex["chosen_reward"] for ex in batch], dtype=torch.float32),
        "rejected_rewards": torch.tensor([ex["rejected_reward"] for ex in batch], dtype=torch.float32),
        "indices": torch.tensor([ex.get("index", -1) for ex in batch], dtype=torch.long),
        "num_tokens": lengths.sum(),
    }


def micro_batch_from_padded(padded: Mapping[str, Tensor]) -> MicroBatch:
    """The ``MicroBatch`` of a ``dpo_custom_collate`` dict: chosen rows, then rejected rows (and cached
    reference log-probs when the dict carries ``ref_chosen_logps`` and ``ref_rejected_logps``)."""
    cached = "ref_chosen_logps" in padded
    labels = torch.cat([padded["chosen_labels"], padded["rejected_labels"]])
    rows, length = labels.shape
    next_labels = labels[:, 1:]
    selected = next_labels != -100
    positions = torch.arange(rows * length, device=labels.device).view(rows, length)[:, :-1]
    row_index = torch.arange(rows, device=labels.device)[:, None].expand_as(next_labels)
    return MicroBatch(
        input_ids=torch.cat([padded["chosen"], padded["rejected"]]),
        position_ids=padded["position_ids"],
        # Right padding: causal attention alone keeps every real token from seeing the padding after it, so
        # no mask is needed, and without one SDPA takes its fused causal kernel instead of a masked one.
        attention_mask=None,
        hidden_index=positions[selected],
        target_ids=next_labels[selected],
        sequence_index=row_index[selected],
        chosen_rewards=padded["chosen_rewards"],
        rejected_rewards=padded["rejected_rewards"],
        indices=padded["indices"],
        num_tokens=int(padded["num_tokens"]),
        num_pairs=len(padded["chosen_rewards"]),
        ref_logps=torch.cat([padded["ref_chosen_logps"], padded["ref_rejected_logps"]]) if cached else None,
        token_weights=padded.get("attention_mask"),
    )


def padded_micro_batches(
    pairs: Sequence[dict[str, Any]],
    *,
    micro_batch_size: int,
    eos_id: int,
    pad_to_multiple_of: int | None = None,
) -> list[MicroBatch]:
    """A rank's share of a global batch as padded micro-batches of ``micro_batch_size`` pairs.

    Pairs are grouped by length (longest first) so each micro-batch pads little; the step's objective is the
    same whatever the grouping, since each micro-batch's loss is weighted by its share of the pairs.
    """
    pairs = sorted(pairs, key=lambda pair: pair_length(pair, "padded"), reverse=True)
    return [
        micro_batch_from_padded(
            dpo_custom_collate(pairs[i : i + micro_batch_size], eos_id, pad_to_multiple_of)
        )
        for i in range(0, len(pairs), micro_batch_size)
    ]
