"""Packing and shared prompt: log-probs, loss and gradients equal the padded layout's; rows and masks."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Qwen3Config

import preftune
from preftune.config_checks import load_config
from preftune.data.batch import as_micro_batch, dpo_custom_collate, pair_length
from preftune.data.packing import build_packed_collate, dense_mask, group_by_prompt, layout_rows
from preftune.modeling.attention import varlen_attention_forward, visible_keys
from preftune.modeling.model import DPOModel
from preftune.tools.tiny import EOS_ID, SLIDING_WINDOW, TINY_ARCHS, save_tiny

LAYOUTS = {"packed": (True, False), "shared": (False, True), "packed+shared": (True, True)}
BUDGET = 128


def build(model_dir, *overrides: str) -> DPOModel:
    model = DPOModel.from_config(
        load_config(None, [f"model.path={model_dir}", "data.train=unused", *overrides])
    )
    return model.train(False)


def examples(vocab: int, n: int = 10, seed: int = 0) -> list[dict]:
    """Token-id pairs: the edge cases (one-token prompt and responses, empty prompt, a long prompt with
    one-token responses), then random ones of up to 30 + 30 tokens, longer than the sliding window."""
    rng = random.Random(seed)
    lengths = [(1, 1, 1), (1, 30, 2), (0, 3, 20), (28, 1, 1)]
    lengths += [(rng.randint(1, 30), rng.randint(1, 30), rng.randint(1, 30)) for _ in range(n)]
    assert max(p + max(c, r) for p, c, r in lengths) > 2 * SLIDING_WINDOW

    def tokens(k: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(k)]

    return [
        {"prompt_ids": tokens(p), "chosen_ids": tokens(c), "rejected_ids": tokens(r),
         "chosen_reward": rng.random(), "rejected_reward": rng.random(), "index": i}
        for i, (p, c, r) in enumerate(lengths)
    ]  # fmt: skip


def collate_for(model: DPOModel, layout: str, **kwargs):
    pack, share = LAYOUTS[layout]
    config = model.policy.config
    kwargs = {"max_tokens_per_row": BUDGET, "rows_per_micro_batch": 2, **kwargs}
    return build_packed_collate(eos_id=EOS_ID, model_config=config, attn_implementation=config._attn_implementation,
                                pack=pack, share_prompt=share, **kwargs)  # fmt: skip


def in_pair_order(micro_batches, values, num_pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-micro-batch [2p] log-probs and counts back in the examples' order (chosen of all, then rejected)."""
    logps, counts = torch.zeros(2 * num_pairs), torch.zeros(2 * num_pairs, dtype=torch.long)
    for batch, (lp, count) in zip(micro_batches, values, strict=True):
        order = torch.cat([batch.indices, batch.indices + num_pairs])
        logps[order], counts[order] = lp, count
    return logps, counts


def padded_logprobs(model: DPOModel, exs: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model.sequence_logprobs(model.policy, dpo_custom_collate(exs, EOS_ID))


def packed_logprobs(
    model: DPOModel, exs: list[dict], layout: str, **kwargs
) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        batches = collate_for(model, layout, **kwargs)(exs)
        return in_pair_order(batches, [model.sequence_logprobs(model.policy, b) for b in batches], len(exs))


def assert_same_logprobs(packed, padded, layout: str) -> None:
    # sums of up to 60 fp32 log-probs of ~5.7 nats: one ulp is 1.5e-5, hence the relative term
    torch.testing.assert_close(packed[0], padded[0], rtol=1e-6, atol=1e-5, msg=layout)
    assert torch.equal(packed[1], padded[1]), layout


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_logprobs_match_padded(arch, tiny_model_dir, tokenizer):
    """Default attention (sdpa; gemma2: eager, alternating sliding/full layers, soft-capped)."""
    model, exs = build(tiny_model_dir(arch)), examples(len(tokenizer))
    padded = padded_logprobs(model, exs)
    for layout in LAYOUTS:
        assert_same_logprobs(packed_logprobs(model, exs, layout), padded, layout)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_logprobs_match_padded_varlen(arch, tiny_model_dir, tokenizer):
    """Segment-wise attention (preftune_varlen) against each family's default attention on padded rows: packed and
    shared-prompt rows, and padded rows themselves (one block per row; mistral's window applied by varlen)."""
    exs = examples(len(tokenizer))
    padded = padded_logprobs(build(tiny_model_dir(arch)), exs)
    model = build(tiny_model_dir(arch), "model.attn_implementation=preftune_varlen")
    assert model.policy.config._attn_implementation == "preftune_varlen"
    assert_same_logprobs(padded_logprobs(model, exs), padded, "padded")
    for layout in LAYOUTS:
        assert_same_logprobs(packed_logprobs(model, exs, layout), padded, layout)
    batches = collate_for(model, "packed")(exs)  # a micro-batch's rows go end to end: no padding at all
    assert all(b.input_ids.shape == (1, int(b.num_tokens)) for b in batches)
    assert any(len(b.indices) > 2 for b in batches)


def test_varlen_is_the_packing_default(tiny_model_dir):
    llama = tiny_model_dir("llama")
    for layout in ("data.packing=true", "data.share_prompt=true"):
        assert build(llama, layout).policy.config._attn_implementation == "preftune_varlen"
    assert build(llama).policy.config._attn_implementation == "sdpa"  # padded: transformers' pick
    assert (
        build(llama, "data.packing=true", "model.attn_implementation=sdpa").policy.config._attn_implementation
        == "sdpa"
    )
    with pytest.raises(ValueError, match="model.compile does not support preftune_varlen"):
        build(llama, "data.packing=true", "model.compile=true")


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_logprobs_match_padded_eager(arch, tiny_model_dir, tokenizer):
    model, exs = build(tiny_model_dir(arch), "model.attn_implementation=eager"), examples(len(tokenizer))
    assert_same_logprobs(packed_logprobs(model, exs, "packed+shared"), padded_logprobs(model, exs), "eager")


def test_logprobs_match_padded_qwen3_mixed_layers(tmp_path, tokenizer):
    """A per-layer-type dict of sdpa masks: one full and one sliding-window layer."""
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, use_sliding_window=True,
                         sliding_window=SLIDING_WINDOW, max_window_layers=1, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    model = build(
        save_tiny(AutoModelForCausalLM.from_config(config, attn_implementation="sdpa"), tokenizer, tmp_path)
    )
    assert set(model.policy.config.layer_types) == {"full_attention", "sliding_attention"}
    exs = examples(len(tokenizer))
    assert_same_logprobs(packed_logprobs(model, exs, "packed+shared"), padded_logprobs(model, exs), "qwen3")


@pytest.mark.slow
def test_logprobs_match_padded_flex_attention(tiny_model_dir, tokenizer):
    """flex_attention BlockMasks, a dict of them (gemma2's sliding and full layers) with soft-capping;
    every micro-batch is padded to one [rows, multiple of 128] shape so flex_attention compiles once."""
    model = build(tiny_model_dir("gemma2"), "model.attn_implementation=flex_attention")
    exs = examples(len(tokenizer))
    padded = padded_logprobs(
        build(tiny_model_dir("gemma2")), exs
    )  # eager: padded shapes would recompile flex
    for layout in LAYOUTS:
        assert_same_logprobs(packed_logprobs(model, exs, layout), padded, layout)
    batches = collate_for(model, "packed", max_tokens_per_row=100)(exs)
    assert {tuple(b.input_ids.shape) for b in batches} == {(2, 128)}


@pytest.mark.parametrize(
    ("arch", "rows_per_micro_batch", "attention"),
    [
        ("llama", 1, "sdpa"),
        ("gemma2", 100, "eager"),
        ("mistral", 2, "preftune_varlen"),
        ("gemma2", 1, "preftune_varlen"),
    ],
)
def test_loss_and_gradients_match_padded(arch, rows_per_micro_batch, attention, tiny_model_dir, tokenizer):
    """One packed+shared micro-batch (100 rows), or several accumulated as the trainer does; the padded side
    always runs the family's default attention."""
    model = build(tiny_model_dir(arch), "dpo.sft_loss_weight=0.5", f"model.attn_implementation={attention}")
    with torch.no_grad():  # move the policy away from the reference so the rewards are not all zero
        for p in model.policy.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    exs = examples(len(tokenizer))

    def loss_and_grads(micro_batches) -> tuple[float, list[torch.Tensor]]:
        model.policy.zero_grad(set_to_none=True)
        total = 0.0
        for batch in micro_batches:
            loss, _ = model.get_loss_and_metrics(batch, forward_only=False)
            weighted = loss * (as_micro_batch(batch).num_pairs / len(exs))
            weighted.backward()
            total += weighted.item()
        return total, [p.grad.clone() for p in model.policy.parameters()]

    packed = collate_for(model, "packed+shared", rows_per_micro_batch=rows_per_micro_batch)(exs)
    assert (len(packed) == 1) == (rows_per_micro_batch == 100)
    packed_loss, packed_grads = loss_and_grads(packed)
    default = "eager" if arch == "gemma2" else "sdpa"  # gemma2's soft-capped attention: no sdpa
    model.policy.set_attn_implementation(default)
    padded_loss, padded_grads = loss_and_grads([dpo_custom_collate(exs, EOS_ID)])
    assert packed_loss == pytest.approx(padded_loss, abs=1e-5)
    assert any(g.abs().max() > 1e-3 for g in padded_grads)
    names = [name for name, _ in model.policy.named_parameters()]
    for name, packed_grad, padded_grad in zip(names, packed_grads, padded_grads, strict=True):
        torch.testing.assert_close(packed_grad, padded_grad, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rows_respect_budget_and_keep_pairs_whole(layout):
    pack, share = LAYOUTS[layout]
    rng = random.Random(1)
    exs = [
        {"prompt_ids": [5] * rng.randint(0, 40), "chosen_ids": [6] * rng.randint(1, 40),
         "rejected_ids": [7] * rng.randint(1, 40), "chosen_reward": 1.0, "rejected_reward": 0.0, "index": 1000 + i}
        for i in range(60)
    ]  # fmt: skip
    budget = 256
    config = LlamaConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=1)
    collate = build_packed_collate(eos_id=EOS_ID, model_config=config, attn_implementation="sdpa", pack=pack,
                                   share_prompt=share, max_tokens_per_row=budget)  # fmt: skip
    micro_batches = collate(exs)
    indices = torch.cat([b.indices for b in micro_batches]).tolist()
    assert sorted(indices) == [ex["index"] for ex in exs]  # every pair exactly once, its index kept
    by_index = {ex["index"]: ex for ex in exs}
    fill = []
    for batch in micro_batches:
        rows, length = batch.input_ids.shape
        assert rows == 1 and length <= budget  # one row each: its length is its real token count
        p = len(batch.indices)
        used = sum(pair_length(by_index[i], "shared" if share else "packed") for i in batch.indices.tolist())
        assert batch.num_tokens == used == length
        fill.append(length)
        assert batch.sequence_index.max() < 2 * p
        for i, index in enumerate(batch.indices.tolist()):  # the targets are each pair's responses
            ex = by_index[index]
            for seq, side in ((i, "chosen_ids"), (p + i, "rejected_ids")):
                targets = batch.target_ids[batch.sequence_index == seq].tolist()
                assert targets == ex[side][0 if ex["prompt_ids"] else 1 :]
        assert torch.equal(batch.chosen_rewards, torch.ones(p))
    if pack:
        assert sum(f <= budget // 2 for f in fill) <= 1  # first fit leaves at most one row half empty
        assert len(fill) <= math.ceil(sum(fill) / budget) + 1  # rows near the budget
    else:
        assert len(fill) == len(exs)
    multi_row = build_packed_collate(eos_id=EOS_ID, model_config=config, attn_implementation="sdpa", pack=pack,
                                     share_prompt=share, max_tokens_per_row=budget, rows_per_micro_batch=4)  # fmt: skip
    for batch in multi_row(exs):  # a pair's chosen and rejected targets lie in one row
        p, length = len(batch.indices), batch.input_ids.shape[1]
        row = batch.hidden_index // length
        for i in range(p):
            assert len(set(row[(batch.sequence_index == i) | (batch.sequence_index == p + i)].tolist())) == 1
    with pytest.raises(ValueError, match="raise data.pack_length"):
        collate([{**exs[0], "chosen_ids": [6] * budget}])


def test_shared_prompt_mask_and_positions():
    """prompt (3) + chosen (2) + rejected (2): rejected sees the prompt and itself at continued positions;
    its first token is predicted by the prompt's last."""
    ex = {"prompt_ids": [10, 11, 12], "chosen_ids": [20, 21], "rejected_ids": [30, 31], "chosen_reward": 1.0,
          "rejected_reward": 0.0, "index": 0}  # fmt: skip
    batch, ids = layout_rows([[ex]], eos_id=EOS_ID, share_prompt=True)
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 4]]
    assert batch.hidden_index.tolist() == [2, 3, 2, 5]
    assert batch.target_ids.tolist() == [20, 21, 30, 31]
    assert batch.sequence_index.tolist() == [0, 0, 1, 1]
    mask = dense_mask(ids, None)[0, 0].int().tolist()
    assert mask[5] == [1, 1, 1, 0, 0, 1, 0]  # rejected's first token: prompt and itself, not chosen
    assert mask[6] == [1, 1, 1, 0, 0, 1, 1]
    windowed = dense_mask(ids, 2)[0, 0].int().tolist()  # the window counts positions, not row offsets
    assert windowed[5] == [0, 0, 1, 0, 0, 1, 0]
    assert windowed[6] == [0, 0, 0, 0, 0, 1, 1]
    # preftune_varlen: prompt+chosen is one causal block; rejected attends to the 3 prompt tokens, then itself
    assert batch.attention_blocks == ((0, 0, 0, 0, 5), (0, 0, 3, 5, 2))
    assert visible_keys(3, 2, None, torch.device("cpu")).int().tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert visible_keys(3, 2, 2, torch.device("cpu")).int().tolist() == [[0, 0, 1, 1, 0], [0, 0, 0, 1, 1]]


def test_varlen_blocks_must_tile_rows():
    q = torch.randn(1, 2, 6, 4)
    blocks = ((0, 0, 0, 0, 3), (0, 0, 0, 3, 3))
    out, _ = varlen_attention_forward(torch.nn.Module(), q, q, q, None, attention_blocks=blocks)
    for start in (0, 3):  # each block equals its sequence alone under causal attention
        alone = F.scaled_dot_product_attention(*[q[:, :, start : start + 3]] * 3, is_causal=True)
        torch.testing.assert_close(out[:, start : start + 3], alone.transpose(1, 2))
    with pytest.raises(ValueError, match="tile it in order"):
        varlen_attention_forward(torch.nn.Module(), q, q, q, None, attention_blocks=blocks[::-1])
    with pytest.raises(ValueError, match="not an attention mask"):
        varlen_attention_forward(torch.nn.Module(), q, q, q, torch.ones(1, 1, 6, 6, dtype=torch.bool))


def test_wrong_masks_give_different_logprobs(tiny_model_dir, tokenizer):
    """Negative controls (the parity tests are sensitive): the same rows with a wrong mask."""
    llama, mistral = build(tiny_model_dir("llama")), build(tiny_model_dir("mistral"))
    exs = examples(len(tokenizer))

    def max_error(model: DPOModel, layout: str, wrong_mask) -> float:
        padded, _ = padded_logprobs(model, exs)
        with torch.no_grad():
            batches = [replace(b, attention_mask=wrong_mask(b)) for b in collate_for(model, layout)(exs)]
            wrong = [model.sequence_logprobs(model.policy, b) for b in batches]
        return (in_pair_order(batches, wrong, len(exs))[0] - padded).abs().max().item()

    # position_ids alone with a 2-D all-ones mask: sequences of a row see each other
    assert max_error(llama, "packed", lambda b: torch.ones_like(b.input_ids)) > 0.1
    # no mask: transformers splits sequences where positions restart, cutting rejected off its prompt
    assert max_error(llama, "packed+shared", lambda b: None) > 0.1
    # llama's mask on mistral's rows (no window): the sliding window matters in these examples
    full = {tuple(b.indices.tolist()): b.attention_mask for b in collate_for(llama, "packed")(exs)}
    assert max_error(mistral, "packed", lambda b: full[tuple(b.indices.tolist())]) > 0.1


def test_unsupported_combinations_raise():
    llama = LlamaConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=1)
    kwargs = {"eos_id": EOS_ID, "max_tokens_per_row": 64, "pack": True, "share_prompt": False}
    with pytest.raises(ValueError, match="flash_attention_2"):
        build_packed_collate(model_config=llama, attn_implementation="flash_attention_2", **kwargs)
    # refused from the config (GPT-NeoX and the other families: tests/test_families.py)
    bidirectional = Gemma3TextConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                                     use_bidirectional_attention=True)  # fmt: skip
    with pytest.raises(ValueError, match="gemma3_text model is bidirectional"):
        build_packed_collate(model_config=bidirectional, attn_implementation="sdpa", **kwargs)
    with pytest.raises(ValueError, match="padded_micro_batches"):
        build_packed_collate(model_config=llama, attn_implementation="sdpa", **{**kwargs, "pack": False})


def test_dpo_packed_dataset(tiny_model_dir, tokenizer):
    """NeMo Aligner's shape: a dataset whose global_collate_fn packs a global batch (here with preftune_varlen)."""
    model = build(tiny_model_dir("llama"), "data.packing=true", "data.share_prompt=true")
    exs = examples(len(tokenizer))
    packed = preftune.DPOPackedDataset(
        exs, model.policy.config, eos_id=EOS_ID, pack_length=BUDGET, share_prompt=True
    )
    assert len(packed) == len(exs) and packed[3] == exs[3]
    batches = packed.global_collate_fn([packed[i] for i in range(len(packed))])
    assert len(batches) > 1 and all(b.attention_mask is None and b.attention_blocks for b in batches)
    with torch.no_grad():
        values = [model.sequence_logprobs(model.policy, b) for b in batches]
    padded = padded_logprobs(build(tiny_model_dir("llama")), exs)
    assert_same_logprobs(in_pair_order(batches, values, len(exs)), padded, "DPOPackedDataset")


def groups(vocab: int, k: int, seed: int) -> list[dict]:
    """K-completion groups (one prompt, K responses, every ordered pair of responses whose rewards differ,
    as ``all_pairs`` draws them): an empty prompt, one-token responses, and prompt + response longer than
    the sliding window."""
    rng = random.Random(seed)
    lengths = [(0, [1] * k), (28, [rng.randint(1, 30) for _ in range(k)])]
    lengths += [(rng.randint(1, 20), [rng.randint(1, 20) for _ in range(k)]) for _ in range(3)]

    def tokens(n: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(n)]

    out = []
    for i, (p, sizes) in enumerate(lengths):
        rewards = [float(rng.randrange(3)) for _ in range(k)]
        pairs = [(a, b) for a in range(k) for b in range(k) if rewards[a] > rewards[b]] or [(0, k - 1)]
        out.append({"prompt_ids": tokens(p), "responses": [tokens(n) for n in sizes], "pairs": pairs,
                    "rewards": rewards, "index": 100 + i})  # fmt: skip
    return out


def as_pairs(groups_: list[dict]) -> list[dict]:
    """The groups' pairs as separate preference pairs (each response repeated in every pair it is in)."""
    return [
        {"prompt_ids": g["prompt_ids"], "chosen_ids": g["responses"][c], "rejected_ids": g["responses"][r],
         "chosen_reward": g["rewards"][c], "rejected_reward": g["rewards"][r], "index": n}
        for n, (g, (c, r)) in enumerate((g, pair) for g in groups_ for pair in g["pairs"])
    ]  # fmt: skip


@pytest.mark.parametrize(("arch", "attention"), [("llama", "preftune_varlen"), ("mistral", "sdpa")])
def test_k_completion_groups_match_separate_sequences(arch, attention, tiny_model_dir, tokenizer):
    """A prompt's K responses laid out after one shared prompt (or packed, each with its own prompt), several
    groups per row: each response's log-prob is computed once, and every pair's log-probs, loss and gradients
    equal those of its chosen and rejected as separate padded sequences (the family's default attention)."""
    model = build(tiny_model_dir(arch), f"model.attn_implementation={attention}")
    with torch.no_grad():  # move the policy away from the reference so the rewards are not all zero
        for p in model.policy.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))

    def loss_and_grads(micro_batches, num_pairs: int) -> tuple[float, list[torch.Tensor]]:
        model.policy.zero_grad(set_to_none=True)
        total = 0.0
        for batch in micro_batches:
            loss, _ = model.get_loss_and_metrics(batch, forward_only=False)
            weighted = loss * (as_micro_batch(batch).num_pairs / num_pairs)
            weighted.backward()
            total += weighted.item()
        return total, [p.grad.clone() for p in model.policy.parameters()]

    for k in (3, 4):
        gs = groups(len(tokenizer), k, seed=k)
        pairs = as_pairs(gs)
        model.policy.set_attn_implementation("sdpa")
        padded = padded_logprobs(model, pairs)
        padded_loss, padded_grads = loss_and_grads([dpo_custom_collate(pairs, EOS_ID)], len(pairs))
        model.policy.set_attn_implementation(attention)
        for layout in LAYOUTS:
            batches = collate_for(model, layout, max_tokens_per_row=160)(gs)
            assert any(len(set(b.indices.tolist())) > 1 for b in batches)  # several groups per micro-batch
            responses = sum(len(r) for g in gs for r in g["responses"]) - k  # the empty prompt's first tokens
            assert sum(len(b.target_ids) for b in batches) == responses  # each response once
            assert sum(b.num_pairs for b in batches) == len(pairs)
            with torch.no_grad():
                got = [model.sequence_logprobs(model.policy, b) for b in batches]
            # pairs come out group by group, in each micro-batch's order: map them back to the pairs' order
            order = {
                (g["index"], pair): n for n, (g, pair) in enumerate((g, p) for g in gs for p in g["pairs"])
            }
            logps, counts = torch.zeros(2 * len(pairs)), torch.zeros(2 * len(pairs), dtype=torch.long)
            for batch, (lp, count) in zip(batches, got, strict=True):
                by_group = {g["index"]: g for g in gs}
                seen = [
                    (i, tuple(p)) for i in dict.fromkeys(batch.indices.tolist()) for p in by_group[i]["pairs"]
                ]
                at = torch.tensor([order[key] for key in seen])
                logps[torch.cat([at, at + len(pairs)])] = lp
                counts[torch.cat([at, at + len(pairs)])] = count
            assert_same_logprobs((logps, counts), padded, f"K={k} {layout}")
            loss, grads = loss_and_grads(batches, len(pairs))
            assert loss == pytest.approx(padded_loss, abs=1e-5), f"K={k} {layout}"
            assert any(g.abs().max() > 1e-3 for g in padded_grads)
            for got_grad, want in zip(grads, padded_grads, strict=True):
                torch.testing.assert_close(got_grad, want, rtol=0, atol=1e-5, msg=f"K={k} {layout}")


def test_group_by_prompt_lays_each_completion_out_once():
    """all_pairs over 3 completions of prompt 7 (3 pairs) and one pair of prompt 9: two groups, each completion
    once; a budget too small for a whole group starts the prompt's next group with the pair that did not fit."""
    completions = {7: [[11], [12, 13], [14, 15, 16]], 9: [[21], [22]]}

    def pair(prompt: int, c: int, r: int) -> dict:
        ids = completions[prompt]
        return {"prompt_ids": [prompt] * 2, "chosen_ids": ids[c], "rejected_ids": ids[r],
                "chosen_reward": float(3 - c), "rejected_reward": float(3 - r),
                "completion_keys": ((prompt, c), (prompt, r))}  # fmt: skip

    pairs = [pair(7, 0, 1), pair(9, 1, 0), pair(7, 0, 2), pair(7, 1, 2)]
    groups_ = group_by_prompt(pairs, 100, share_prompt=True)
    assert [(g["index"], g["responses"], g["pairs"], g["rewards"]) for g in groups_] == [
        (7, [[11], [12, 13], [14, 15, 16]], [(0, 1), (0, 2), (1, 2)], [3.0, 2.0, 1.0]),
        (9, [[22], [21]], [(0, 1)], [2.0, 3.0]),
    ]
    # shared prompt, budget 6: prompt 7's group holds [11] [12 13] (2 + 1 + 2 = 5 tokens); adding [14 15 16]
    # would make 8, so pair (0, 2) starts a new group (6 tokens), and pair (1, 2) the next one
    split = group_by_prompt(pairs, 6, share_prompt=True)
    assert [(g["index"], g["responses"], g["pairs"]) for g in split] == [
        (7, [[11], [12, 13]], [(0, 1)]),
        (9, [[22], [21]], [(0, 1)]),
        (7, [[11], [14, 15, 16]], [(0, 1)]),
        (7, [[12, 13], [14, 15, 16]], [(0, 1)]),
    ]
    # each prompt's own copy when not shared: prompt 7's group of three takes 3 x 2 + 6 = 12 tokens
    assert len(group_by_prompt(pairs, 12, share_prompt=False)) == 2
    assert len(group_by_prompt(pairs, 11, share_prompt=False)) == 4  # as the shared split above
