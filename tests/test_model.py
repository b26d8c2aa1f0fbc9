"""DPOModel: log-probs against an independent slow path, step-0 properties, dropout, frozen reference."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from preftune.config_checks import load_config
from preftune.data.batch import dpo_custom_collate
from preftune.data.formats import parse_record
from preftune.data.tokenize import PairTokenizer
from preftune.modeling.model import DPOModel
from preftune.modeling.reference import FrozenReference
from preftune.tools.tiny import TINY_ARCHS

from conftest import make_pairs


def build(model_dir, *overrides: str) -> DPOModel:
    cfg = load_config(None, [f"model.path={model_dir}", "data.train=unused", *overrides])
    return DPOModel.from_config(cfg)


def examples(tokenizer, n: int = 6, seed: int = 3) -> list[dict]:
    pair_tokenizer = PairTokenizer(tokenizer, max_seq_length=64)
    pairs = [pair_tokenizer(parse_record(p, "nemo", "test")) for p in make_pairs(n, seed=seed)]
    # include one-token responses and a one-token prompt
    pairs.append(
        pair_tokenizer(
            {"prompt": "", "chosen": "cat", "rejected": "dog", "chosen_reward": 1.0, "rejected_reward": 0.0}
        )
    )
    return pairs


def slow_logprobs(model, example: dict, side: str) -> float:
    """Sum of log p(response token) from the model's own full logits on the unpadded sequence."""
    prompt, response = example["prompt_ids"], example[f"{side}_ids"]
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits.double()
    logp = logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
    return logp[len(prompt) - 1 :].sum().item()


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("chunk", [3, 0])
def test_sequence_logprobs_match_full_logits(arch, chunk, tiny_model_dir, tokenizer):
    model = build(tiny_model_dir(arch), f"model.logprob_chunk_size={chunk}")
    model.train(False)
    exs = examples(tokenizer)
    batch = dpo_custom_collate(exs, tokenizer.eos_token_id, pad_to_multiple_of=8)
    with torch.no_grad():
        logps, counts = model.sequence_logprobs(model.policy, batch)
    n = len(exs)
    for i, ex in enumerate(exs):
        for side, row in (("chosen", i), ("rejected", n + i)):
            expected = slow_logprobs(model.policy, ex, side)
            assert logps[row].item() == pytest.approx(expected, abs=1e-4, rel=1e-5), (arch, i, side)
            assert counts[row].item() == len(ex[f"{side}_ids"])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_step_zero_is_log2_with_zero_rewards(arch, tiny_model_dir, tokenizer):
    model = build(tiny_model_dir(arch))
    batch = dpo_custom_collate(examples(tokenizer), tokenizer.eos_token_id)
    loss, metrics = model.get_loss_and_metrics(batch, forward_only=False)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)
    assert metrics["acc"].item() == 0.0
    assert metrics["rewards_chosen_mean"].item() == pytest.approx(0.0, abs=1e-6)
    assert metrics["rewards_rejected_mean"].item() == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.policy.parameters())


def test_sft_and_weights_combine(tiny_model_dir, tokenizer):
    model = build(
        tiny_model_dir("llama"),
        "dpo.sft_loss_weight=0.5",
        "dpo.preference_loss_weight=2.0",
        "dpo.sft_average_log_probs=true",
    )
    exs = examples(tokenizer)
    batch = dpo_custom_collate(exs, tokenizer.eos_token_id)
    loss, metrics = model.get_loss_and_metrics(batch, forward_only=True)
    expected_sft = -sum(
        slow_logprobs(model.policy, ex, "chosen") / len(ex["chosen_ids"]) for ex in exs
    ) / len(exs)
    assert metrics["sft_loss"].item() == pytest.approx(expected_sft, rel=1e-5)
    assert loss.item() == pytest.approx(2.0 * math.log(2) + 0.5 * expected_sft, rel=1e-5)


def test_dropout_disabled_by_default(tiny_model_dir, tokenizer):
    """gpt2 ships with dropout 0.1: in train mode log-probs are noisy unless dropout is disabled."""
    batch = dpo_custom_collate(examples(tokenizer), tokenizer.eos_token_id)
    for disable, expect_equal in ((True, True), (False, False)):
        model = build(tiny_model_dir("gpt2"), f"model.disable_dropout={str(disable).lower()}")
        model.train()
        torch.manual_seed(0)
        a, _ = model.sequence_logprobs(model.policy, batch)
        b, _ = model.sequence_logprobs(model.policy, batch)
        assert torch.equal(a, b) is expect_equal


def test_reference_is_frozen_copy(tiny_model_dir, tokenizer):
    model = build(tiny_model_dir("llama"), "optim.lr=0.01")
    assert isinstance(model.reference, FrozenReference)
    reference = model.reference.model
    assert reference is not model.policy
    assert not any(p.requires_grad for p in reference.parameters())
    assert not reference.training
    ref_ids = {id(p) for p in reference.parameters()}
    assert not ref_ids & {id(p) for p in model.parameters()}, "reference weights must not be trainable params"
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = dpo_custom_collate(examples(tokenizer), tokenizer.eos_token_id)
    loss, _ = model.get_loss_and_metrics(batch, forward_only=False)
    loss.backward()
    optimizer.step()
    model.train()
    assert not reference.training
    for key, value in reference.state_dict().items():
        assert torch.equal(value, before[key]), key
    _, metrics = model.get_loss_and_metrics(batch, forward_only=True)
    assert metrics["ref_logps_chosen_mean"].item() != pytest.approx(
        metrics["logps_chosen_mean"].item(), abs=1e-6
    )


def test_precomputed_reference_logps_are_used(tiny_model_dir, tokenizer):
    model = build(tiny_model_dir("llama"))
    batch = dpo_custom_collate(examples(tokenizer), tokenizer.eos_token_id)
    with torch.no_grad():
        ref = model.reference_logprobs(batch)
    n = len(batch["chosen"])
    shifted = {**batch, "ref_chosen_logps": ref[:n] + 1.0, "ref_rejected_logps": ref[n:]}
    _, metrics = model.get_loss_and_metrics(shifted, forward_only=True)
    beta = OmegaConf.to_container(load_config(None, ["model.path=x", "data.train=y"]).dpo)[
        "ref_policy_kl_penalty"
    ]
    assert metrics["rewards_chosen_mean"].item() == pytest.approx(-beta, abs=1e-5)
    assert metrics["rewards_rejected_mean"].item() == pytest.approx(0.0, abs=1e-5)


def test_activation_checkpointing_gives_the_same_gradients(tiny_model_dir, tokenizer):
    batch = dpo_custom_collate(examples(tokenizer), tokenizer.eos_token_id)
    grads = []
    for flag in ("false", "true"):
        model = build(tiny_model_dir("llama"), f"model.activation_checkpointing={flag}")
        with torch.no_grad():  # move the policy off the reference so the DPO gradient is not symmetric
            for p in model.policy.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        model.train()
        loss, _ = model.get_loss_and_metrics(batch, forward_only=False)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.policy.named_parameters()})
        assert model.policy.is_gradient_checkpointing is (flag == "true")
        assert not model.reference.model.is_gradient_checkpointing
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_bf16_autocast_stays_close_and_fp32(tiny_model_dir, tokenizer):
    batch = dpo_custom_collate(examples(tokenizer), tokenizer.eos_token_id)
    exact = build(tiny_model_dir("llama"))
    mixed = build(tiny_model_dir("llama"), "model.autocast=bfloat16")
    with torch.no_grad():
        a, _ = exact.sequence_logprobs(exact.policy, batch)
        b, _ = mixed.sequence_logprobs(mixed.policy, batch)
    assert b.dtype == torch.float32 and not torch.equal(a, b), "autocast should change the arithmetic"
    torch.testing.assert_close(b, a, rtol=2e-2, atol=0.5)


def test_auto_chunk_bounds_logit_memory():
    from preftune.modeling.logprobs import LOGITS_CHUNK_ELEMENTS, auto_chunk_size

    assert auto_chunk_size(4096) == auto_chunk_size(32768) == 1024
    for vocab in (128_256, 151_936, 262_144):
        chunk = auto_chunk_size(vocab)
        assert chunk < 1024 and chunk * vocab <= LOGITS_CHUNK_ELEMENTS < (chunk + 1) * vocab
