"""Each reference strategy, and ``reference.path``: a separate reference model with the same tokenizer."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM

from preftune.config_checks import load_config
from preftune.data.batch import as_micro_batch
from preftune.errors import ConfigError
from preftune.modeling.logprobs import SequenceLogprobs
from preftune.modeling.model import DPOModel
from preftune.modeling.reference import CachedReference, FrozenReference, NoReference
from preftune.recipe import check_same_tokenizer
from preftune.tools.tiny import build_tiny_model, save_tiny, train_tokenizer

from conftest import pair_batch, records, run


def build(model_dir, *overrides: str) -> DPOModel:
    return DPOModel.from_config(load_config(None, [f"model.path={model_dir}", "data.train=x", *overrides]))


def logprobs_of(model_dir, batch) -> torch.Tensor:
    lm = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return SequenceLogprobs(lm)(as_micro_batch(batch))[0]


def test_frozen_copy_is_the_starting_policy(tiny_model_dir, tokenizer):
    model = build(tiny_model_dir("llama"))
    assert isinstance(model.reference, FrozenReference)
    batch = pair_batch(tokenizer)
    torch.testing.assert_close(model.reference_logprobs(batch), logprobs_of(tiny_model_dir("llama"), batch))
    assert model.reference.model is not model.policy and not model.reference.model.training


def test_reference_path_scores_with_the_other_model(tiny_model_dir, other_model_dir, tokenizer):
    model = build(tiny_model_dir("llama"), f"reference.path={other_model_dir}")
    assert isinstance(model.reference, FrozenReference)
    batch = pair_batch(tokenizer)
    reference = model.reference_logprobs(batch)
    torch.testing.assert_close(reference, logprobs_of(other_model_dir, batch))
    policy, _ = model.sequence_logprobs(model.policy, batch)
    assert (reference - policy).abs().max() > 1e-2, "the reference is not the policy"
    loss, metrics = model.get_loss_and_metrics(batch, forward_only=True)
    assert loss.item() != pytest.approx(math.log(2), abs=1e-3)  # step 0 is no longer log 2
    n = len(reference) // 2
    assert metrics["ref_logps_chosen_mean"].item() == pytest.approx(reference[:n].mean().item(), abs=1e-5)
    assert not any(p.requires_grad for p in model.reference.model.parameters())


def test_cached_reference_reads_the_batch_and_refuses_without():
    reference = CachedReference()
    batch = as_micro_batch(
        {
            "chosen": torch.tensor([[5, 6, 2]]),
            "rejected": torch.tensor([[5, 7, 2]]),
            "chosen_labels": torch.tensor([[-100, 6, 2]]),
            "rejected_labels": torch.tensor([[-100, 7, 2]]),
            "position_ids": torch.arange(3).expand(2, 3),
            "chosen_rewards": torch.ones(1),
            "rejected_rewards": torch.zeros(1),
            "indices": torch.tensor([0]),
            "num_tokens": torch.tensor(6),
        }
    )
    with pytest.raises(ValueError, match="no cached reference log-probs"):
        reference.logprobs(batch)
    cached = replace(batch, ref_logps=torch.tensor([-3.0, -4.0]))
    assert reference.logprobs(cached).tolist() == [-3.0, -4.0]


def test_no_reference_for_reference_free_losses(tiny_model_dir, tokenizer, forbid_model_copies):
    model = build(tiny_model_dir("llama"), "dpo.preference_loss=simpo")
    assert isinstance(model.reference, NoReference)
    assert model.reference_logprobs(pair_batch(tokenizer)) is None
    with pytest.raises(ConfigError, match="uses no reference"):
        load_config(None, ["model.path=x", "data.train=y", "dpo.preference_loss=simpo", "reference.path=z"])


def test_reference_path_needs_the_same_tokenizer(tmp_path, tiny_model_dir, tokenizer):
    other_tokenizer = train_tokenizer(["completely different words here"] * 20, vocab_size=280)
    other = save_tiny(
        build_tiny_model("llama", len(other_tokenizer), hidden_size=32), other_tokenizer, tmp_path
    )
    check_same_tokenizer(tokenizer, str(tiny_model_dir("llama")), trust_remote_code=False)
    with pytest.raises(ConfigError, match="different tokenizer"):
        check_same_tokenizer(tokenizer, str(other), trust_remote_code=False)


@pytest.mark.slow
def test_reference_path_precompute_matches_online(tmp_path, tiny_model_dir, other_model_dir, pair_files):
    common = (f"reference.path={other_model_dir}", "trainer.max_steps=3")
    _, online = run(tmp_path, "online", tiny_model_dir("llama"), pair_files, *common)
    _, cached = run(
        tmp_path, "cached", tiny_model_dir("llama"), pair_files, *common, "reference.mode=precompute"
    )
    a, b = records(online, "train"), records(cached, "train")
    assert a[1]["train/loss"] != pytest.approx(math.log(2), abs=1e-3)
    for step in a:
        for key in ("train/loss", "train/ref_logps_chosen_mean", "train/acc"):
            assert b[step][key] == pytest.approx(a[step][key], abs=1e-5), (step, key)
