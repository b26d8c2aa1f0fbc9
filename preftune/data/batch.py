"""The padded collate: a micro-batch of tokenized pairs as right-padded tensors."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


def dpo_custom_collate(
    batch: Sequence[dict[str, Any]], eos_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, Tensor]:
    """Right-pad prompt+chosen and prompt+rejected of a micro-batch to one length.

    Returns ``chosen``, ``rejected`` ([B, T] token ids, padded with ``eos_id``), ``chosen_length``,
    ``rejected_length`` ([B] real lengths), ``chosen_labels``, ``rejected_labels`` ([B, T], -100 on the
    prompt and the padding), ``attention_mask`` and ``position_ids`` ([2B, T]: chosen rows then rejected
    rows, the order of the single policy forward), ``chosen_rewards``, ``rejected_rewards`` ([B]),
    ``indices`` ([B] dataset indices) and ``num_tokens`` (real tokens in the batch).
    """
    chosen = [ex["prompt_ids"] + ex["chosen_ids"] for ex in batch]
    rejected = [ex["prompt_ids"] + ex["rejected_ids"] for ex in batch]
    length = max(len(s) for s in chosen + rejected)
    if pad_to_multiple_of:
        length = math.ceil(length / pad_to_multiple_of) * pad_to_multiple_of

    def pad(seqs: list[list[int]], value: int) -> Tensor:
        return torch.tensor([s + [value] * (length - len(s)) for s in seqs], dtype=torch.long)

    def labels(seqs: list[list[int]]) -> Tensor:
        return pad(
            [
                [-100] * len(ex["prompt_ids"]) + s[len(ex["prompt_ids"]) :]
                for ex, s in zip(batch, seqs, strict=True)
            ],
            -100,
        )

    lengths = torch.tensor([len(s) for s in chosen + rejected])
    positions = torch.arange(length)
    return {
        "chosen": pad(chosen, eos_id),
        "rejected": pad(rejected, eos_id),
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


def padded_micro_batches(
    pairs: Sequence[dict[str, Any]],
    *,
    micro_batch_size: int,
    eos_id: int,
    pad_to_multiple_of: int | None = None,
) -> list[dict[str, Tensor]]:
    """A rank's share of a global batch as padded micro-batches of ``micro_batch_size`` pairs.

    Pairs are grouped by length (longest first) so each micro-batch pads little; the step's objective is the
    same whatever the grouping, since each micro-batch's loss is weighted by its share of the pairs.
    """
    pairs = sorted(pairs, key=padded_length, reverse=True)
    return [
        dpo_custom_collate(pairs[i : i + micro_batch_size], eos_id, pad_to_multiple_of)
        for i in range(0, len(pairs), micro_batch_size)
    ]


def padded_length(pair: dict[str, Any]) -> int:
    """Tokens of prompt + the longer response: the padded length a pair needs."""
    return len(pair["prompt_ids"]) + max(len(pair["chosen_ids"]), len(pair["rejected_ids"]))
