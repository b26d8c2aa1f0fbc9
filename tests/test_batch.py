"""MicroBatch: the worked example of its docstring, padded and packed, token by token."""

from __future__ import annotations

import pytest
import torch

from preftune.data.batch import Block, MicroBatch, padded_micro_batches, pair_length
from preftune.data.packing import layout_rows

E = 2  # the EOS id of the docstring's example (also the padding)
PAIR_A = {"prompt_ids": [5, 6], "chosen_ids": [7, E], "rejected_ids": [8, 9, E], "index": 0}
PAIR_B = {"prompt_ids": [5], "chosen_ids": [4, E], "rejected_ids": [3, E], "index": 1}
for pair, (chosen, rejected) in ((PAIR_A, (1.0, 0.0)), (PAIR_B, (2.0, -1.0))):
    pair.update(chosen_reward=chosen, rejected_reward=rejected)


def test_padded_example_of_the_docstring():
    (batch,) = padded_micro_batches([PAIR_B, PAIR_A], micro_batch_size=2, eos_id=E)
    assert batch.input_ids.tolist() == [
        [5, 6, 7, E, E],
        [5, 4, E, E, E],
        [5, 6, 8, 9, E],
        [5, 3, E, E, E],
    ]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4]] * 4
    assert batch.attention_mask is None and batch.attention_blocks is None
    assert batch.hidden_index.tolist() == [1, 2, 5, 6, 11, 12, 13, 15, 16]
    assert batch.target_ids.tolist() == [7, E, 4, E, 8, 9, E, 3, E]
    assert batch.sequence_index.tolist() == [0, 0, 1, 1, 2, 2, 2, 3, 3]
    assert batch.indices.tolist() == [0, 1]  # longest pair first
    assert batch.chosen_rewards.tolist() == [1.0, 2.0] and batch.rejected_rewards.tolist() == [0.0, -1.0]
    assert batch.num_pairs == 2 and batch.num_tokens == 4 + 3 + 5 + 3
    # each target is the token after its hidden state's position in the flat rows
    flat = batch.input_ids.flatten()
    assert torch.equal(flat[batch.hidden_index + 1], batch.target_ids)


def test_packed_example_of_the_docstring():
    batch, ids = layout_rows([[PAIR_A, PAIR_B]], eos_id=E, share_prompt=False)
    assert batch.input_ids.tolist() == [[5, 6, 7, E, 5, 6, 8, 9, E, 5, 4, E, 5, 3, E]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2]]
    assert batch.attention_blocks == (Block(0, 0, 0, 0, 4), Block(0, 4, 0, 4, 5), Block(0, 9, 0, 9, 3),
                                      Block(0, 12, 0, 12, 3))  # fmt: skip
    assert batch.hidden_index.tolist() == [1, 2, 5, 6, 7, 9, 10, 12, 13]
    assert batch.target_ids.tolist() == [7, E, 8, 9, E, 4, E, 3, E]
    assert batch.sequence_index.tolist() == [0, 0, 2, 2, 2, 1, 1, 3, 3]
    assert batch.num_pairs == 2 and batch.num_tokens == 15
    assert ids.segment.tolist() == [[0] * 4 + [1] * 5 + [2] * 3 + [3] * 3]
    flat = batch.input_ids.flatten()
    assert torch.equal(flat[batch.hidden_index + 1], batch.target_ids)


def test_both_layouts_train_the_same_tokens_of_each_sequence():
    (padded,) = padded_micro_batches([PAIR_A, PAIR_B], micro_batch_size=2, eos_id=E)
    packed, _ = layout_rows([[PAIR_A, PAIR_B]], eos_id=E, share_prompt=True)
    for sequence in range(4):
        assert (
            padded.target_ids[padded.sequence_index == sequence].tolist()
            == packed.target_ids[packed.sequence_index == sequence].tolist()
        )


def test_to_moves_every_tensor_and_keeps_the_rest():
    batch, _ = layout_rows([[PAIR_A]], eos_id=E, share_prompt=False)
    batch = MicroBatch(**{**batch.__dict__, "ref_logps": torch.tensor([-1.0, -2.0])})
    moved = batch.to("meta")
    assert moved.input_ids.device.type == "meta" and moved.ref_logps.device.type == "meta"
    assert moved.attention_blocks == batch.attention_blocks and moved.num_pairs == 1
    assert batch.input_ids.device.type == "cpu", "to() returns a new batch"


@pytest.mark.parametrize(
    ("layout", "expected"), [("padded", 2 + 3), ("packed", 2 * 2 + 2 + 3), ("shared", 2 + 2 + 3)]
)
def test_pair_length(layout, expected):
    assert pair_length(PAIR_A, layout) == expected
