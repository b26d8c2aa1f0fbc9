"""Context parallelism: the split of a row over context ranks (by hand, and its properties), and CP=2 over
gloo equal to one process (per-sequence log-probs, loss, every gradient) on packed and shared-prompt rows.

The 2-process comparison (``check_context_parallel``) runs on both ranks of test_distributed.py's
two-process launch, before its training runs; each rank writes its findings for the test here."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from test_cli_errors import assert_one_line, base_args

from preftune.cli import main
from preftune.data.batch import ContextShard, MicroBatch
from preftune.data.context_split import local_offsets, split_for_context
from preftune.data.packing import build_packed_collate, layout_rows
from preftune.losses import LossSettings
from preftune.modeling.model import DPOModel
from preftune.tools.tiny import EOS_ID, SLIDING_WINDOW, build_tiny_model

E = EOS_ID
VOCAB = 64


def pair(prompt: list[int], chosen: list[int], rejected: list[int], index: int) -> dict:
    return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected, "chosen_reward": 1.0,
            "rejected_reward": 0.0, "index": index}  # fmt: skip


def test_split_of_a_twelve_token_row_by_hand():
    """A = ([3], [4 5 E], [6 E]), B = ([7], [9 E], [E]) packed in one row of 12 tokens; C = 2: chunks of 3,
    rank 0 holds chunks 0 and 3 (offsets 0-2, 9-11), rank 1 chunks 1 and 2 (offsets 3-8)::

        offset     0 1 2  3 4 5  6 7 8  9 10 11
        input_ids  3 4 5  E 3 6  E 7 9  E  7  E
        position   0 1 2  3 0 1  2 0 1  2  0  1
        trained    4 5 E  . 6 E  . 9 E  .  E  .     (the token the state at this offset predicts)
        sequence   0 0 0  . 2 2  . 1 1  .  3  .
    """
    batch, _ = layout_rows([[pair([3], [4, 5, E], [6, E], 0), pair([7], [9, E], [E], 1)]], eos_id=E,
                           share_prompt=False)  # fmt: skip
    assert batch.input_ids.tolist() == [[3, 4, 5, E, 3, 6, E, 7, 9, E, 7, E]]
    assert batch.hidden_index.tolist() == [0, 1, 2, 4, 5, 7, 8, 10]
    zero, one = (split_for_context(batch, rank, 2, pad_id=E) for rank in (0, 1))
    assert zero.context_shard == ContextShard(rank=0, size=2, chunk_length=3, row_length=12)
    assert one.context_shard == ContextShard(rank=1, size=2, chunk_length=3, row_length=12)
    assert zero.input_ids.tolist() == [[3, 4, 5, E, 7, E]]  # offsets 0 1 2 9 10 11
    assert zero.position_ids.tolist() == [[0, 1, 2, 2, 0, 1]]
    assert (zero.hidden_index.tolist(), zero.target_ids.tolist()) == ([0, 1, 2, 4], [4, 5, E, E])
    assert zero.sequence_index.tolist() == [0, 0, 0, 3]
    assert one.input_ids.tolist() == [[E, 3, 6, E, 7, 9]]  # offsets 3 .. 8
    assert one.position_ids.tolist() == [[3, 0, 1, 2, 0, 1]]
    assert (one.hidden_index.tolist(), one.target_ids.tolist()) == ([1, 2, 4, 5], [6, E, 9, E])
    assert one.sequence_index.tolist() == [2, 2, 1, 1]
    for part in (zero, one):  # the whole row's blocks, the pairs' fields as they were
        assert part.attention_blocks == batch.attention_blocks
        assert torch.equal(part.chosen_rewards, batch.chosen_rewards) and part.num_tokens == batch.num_tokens
    assert split_for_context(batch, 0, 1, pad_id=E) is batch


def test_split_pads_the_row_to_2c_chunks():
    """MicroBatch's docstring example: 15 tokens, C = 2 -> padded to 16 (E at position 0), chunks of 4."""
    batch, _ = layout_rows([[pair([5, 6], [7, E], [8, 9, E], 0), pair([5], [4, E], [3, E], 1)]], eos_id=E,
                           share_prompt=False)  # fmt: skip
    zero, one = (split_for_context(batch, rank, 2, pad_id=E) for rank in (0, 1))
    assert zero.input_ids.tolist() == [[5, 6, 7, E, 5, 3, E, E]]
    assert zero.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 0]]
    assert zero.hidden_index.tolist() == [1, 2, 4, 5] and zero.target_ids.tolist() == [7, E, 3, E]
    assert zero.sequence_index.tolist() == [0, 0, 3, 3]
    assert one.input_ids.tolist() == [[5, 6, 8, 9, E, 5, 4, E]]
    assert one.hidden_index.tolist() == [1, 2, 3, 5, 6] and one.target_ids.tolist() == [8, 9, E, 4, E]
    assert one.sequence_index.tolist() == [2, 2, 2, 1, 1]
    assert zero.token_weights.tolist() == [[1, 1, 1, 1, 1, 1, 1, 0]]


def random_pairs(n: int, seed: int, longest: int = 30) -> list[dict]:
    rng = random.Random(seed)

    def tokens(k: int) -> list[int]:
        return [rng.randrange(3, VOCAB) for _ in range(k)]

    return [pair(tokens(rng.randint(0, longest)), tokens(rng.randint(1, longest)), tokens(rng.randint(1, longest)), i)
            for i in range(n)]  # fmt: skip


@pytest.mark.parametrize("size", [2, 3, 4])
@pytest.mark.parametrize("share_prompt", [False, True])
def test_every_trained_token_on_exactly_one_rank(size, share_prompt):
    """Each trained token is kept by exactly one rank, with the token at the same row offset and the same
    position as unsplit; each rank holds 2 chunks of one length, front chunk r and back chunk 2C-1-r."""
    batch, _ = layout_rows([random_pairs(5, seed=size)], eos_id=E, share_prompt=share_prompt)
    length = batch.input_ids.shape[1]
    seen = []
    for rank in range(size):
        part = split_for_context(batch, rank, size, pad_id=E)
        shard = part.context_shard
        offsets = local_offsets(shard)
        assert shard.chunks == (rank, 2 * size - 1 - rank) and len(offsets) == 2 * shard.chunk_length
        real = offsets < length
        assert torch.equal(part.input_ids[0, real], batch.input_ids[0, offsets[real]])
        assert torch.equal(part.position_ids[0, real], batch.position_ids[0, offsets[real]])
        global_index = offsets[part.hidden_index]
        seen += zip(
            global_index.tolist(), part.target_ids.tolist(), part.sequence_index.tolist(), strict=True
        )
    whole = zip(
        batch.hidden_index.tolist(), batch.target_ids.tolist(), batch.sequence_index.tolist(), strict=True
    )
    assert sorted(seen) == sorted(whole)


# --- CP = 2 against one process, over gloo ------------------------------------------------------------------

CASES = {  # name: (tiny family, share_prompt, pairs): 8 pairs of up to 32 + 32 + 32 tokens in one row
    "llama-packed": ("llama", False, 8),
    "llama-shared": ("llama", True, 8),
    "mistral-shared": ("mistral", True, 8),  # sliding windows: sequences longer than the window
    "gemma2-shared": ("gemma2", True, 8),  # soft-capped attention and logits, sliding and full layers
    "llama-one-long-prompt": ("llama", True, 0),  # rank 1 holds prompt tokens only: nothing to train
}


def compare_case(arch: str, share_prompt: bool, num_pairs: int, rank: int, size: int) -> dict[str, float]:
    """The largest differences of CP=``size`` from one process, on this rank: per-sequence log-probs and
    counts, loss, every gradient (summed over the ranks), for one packed row of several pairs."""
    policy = build_tiny_model(arch, VOCAB, num_layers=2, hidden_size=32, num_heads=4)
    policy.set_attn_implementation("preftune_varlen")
    with torch.no_grad():  # the reference is the starting policy: move the policy away from it
        model = DPOModel(policy, None, LossSettings.from_config({"sft_loss_weight": 0.5}))
        for p in policy.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    pairs = random_pairs(num_pairs, seed=1, longest=2 * SLIDING_WINDOW)
    if not pairs:  # 40 + 3 + 3 tokens: chunks of 12, rank 1 holds offsets 12-35, all of the prompt
        pairs = [pair(list(range(3, 43)), [4, 5, E], [6, 7, E], 0)]
    collate = build_packed_collate(eos_id=E, model_config=policy.config, attn_implementation="preftune_varlen",
                                   pack=True, share_prompt=share_prompt, max_tokens_per_row=4096)  # fmt: skip
    (batch,) = collate(pairs)

    def run(b: MicroBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        policy.zero_grad(set_to_none=True)
        logps, counts = model.policy_logprobs(b)
        loss, _ = model.get_loss_and_metrics(b, forward_only=False)
        loss.backward()
        return logps.detach(), counts, loss.detach(), [p.grad.clone() for p in policy.parameters()]

    one = run(batch)
    split = run(split_for_context(batch, rank, size, pad_id=E))
    own = max((a - b).abs().max().item() for a, b in zip(split[3], one[3], strict=True))
    for grad in split[3]:  # each rank holds its part of every gradient
        dist.all_reduce(grad)
    return {
        "own_gradient": own,
        "logps": (split[0] - one[0]).abs().max().item(),
        "counts": (split[1] - one[1]).abs().max().item(),
        "loss": (split[2] - one[2]).abs().item(),
        "gradient": max((a - b).abs().max().item() for a, b in zip(split[3], one[3], strict=True)),
        "largest_gradient": max(g.abs().max().item() for g in one[3]),
        "chunk_length": split_for_context(batch, rank, size, pad_id=E).context_shard.chunk_length,
        "sequences": len(one[0]),
        "trained_tokens": len(split_for_context(batch, rank, size, pad_id=E).target_ids),
    }


def check_context_parallel(out: Path) -> None:
    """This rank's findings on every case, written to ``out.RANK`` (the launch's 2-rank group is up)."""
    rank, size = dist.get_rank(), dist.get_world_size()
    found = {name: compare_case(*case, rank, size) for name, case in CASES.items()}
    out.with_name(f"{out.name}.{rank}").write_text(json.dumps(found))


@pytest.mark.slow
def test_context_parallel_equals_one_process(two_process_runs):
    """Two gloo processes, CP=2, each comparing its split forward/backward with the unsplit one of the same
    model and batch: per-sequence log-probs, counts, loss and every gradient to 1e-5."""
    out = two_process_runs / "context-parallel"
    for rank in range(2):
        found = json.loads(out.with_name(f"{out.name}.{rank}").read_text())
        assert set(found) == set(CASES)
        for name, diff in found.items():
            num_pairs = CASES[name][2]
            assert diff["sequences"] == 2 * max(num_pairs, 1), name
            assert diff["chunk_length"] == 12 if num_pairs == 0 else diff["chunk_length"] > 2 * SLIDING_WINDOW
            assert (diff["trained_tokens"] == 0) == (num_pairs == 0 and rank == 1), name
            assert diff["largest_gradient"] > 1e-2, name  # the gradients compared are not all zero
            assert diff["own_gradient"] > 1e-3, name  # a rank alone holds only its part of them
            assert diff["counts"] == 0, name
            assert diff["logps"] < 1e-4 and diff["loss"] < 1e-5 and diff["gradient"] < 1e-5, (name, diff)


def test_context_parallel_mistakes_are_one_line(tmp_path, tiny_model_dir, pair_files, tokenizer, capsys,
                                                monkeypatch):  # fmt: skip
    """CP=2 on two ranks without packed rows, with an attention that takes a mask, or with a MoE policy's
    balancing loss: one line, exit 2, before anything loads."""
    from test_families import saved_family

    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    cp = ["distributed.strategy=fsdp2", "distributed.context_parallel=2"]
    packed = ["data.packing=true", "data.share_prompt=true"]
    mixtral = saved_family("mixtral", tokenizer, tmp_path / "mixtral")
    cases = [
        (tiny_model_dir("llama"), cp, ("splits packed rows", "data.packing=true")),
        (tiny_model_dir("llama"), [*cp, *packed, "model.attn_implementation=sdpa"],
         ("needs model.attn_implementation=preftune_varlen", "not sdpa")),
        (mixtral, [*cp, *packed], ("mixtral policy's router balancing loss", "model.router_aux_loss_coef=0")),
    ]  # fmt: skip
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")  # nothing listens: a rule that let the run start would fail here
    capsys.readouterr()
    for model_dir, overrides, expected in cases:
        code = main(["train", "--config", str(config), *base_args(model_dir, pair_files, tmp_path / "out"),
                     *overrides])  # fmt: skip
        captured = capsys.readouterr()
        assert code == 2, (overrides, captured.err)
        assert_one_line(captured.err, *expected)
