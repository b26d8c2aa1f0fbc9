"""The loss family through the real model and recipe: reference-free losses, mixtures, R-DPO, BCO state."""

from __future__ import annotations

import json
import math

import pytest
import torch

from preftune import losses
from preftune.config_checks import load_config
from preftune.errors import ConfigError
from preftune.modeling.model import DPOModel
from preftune.modeling.reference import NoReference

from conftest import pair_batch, records, run


def build(model_dir, *overrides: str) -> DPOModel:
    return DPOModel.from_config(load_config(None, [f"model.path={model_dir}", "data.train=x", *overrides]))


@pytest.mark.parametrize("name", sorted(losses.REFERENCE_FREE_LOSSES))
def test_reference_free_losses_build_no_reference(name, tiny_model_dir, tokenizer, forbid_model_copies):
    model = build(tiny_model_dir("llama"), f"dpo.preference_loss={name}")
    assert isinstance(model.reference, NoReference)
    batch = pair_batch(tokenizer, seed=5)
    loss, metrics = model.get_loss_and_metrics(batch, forward_only=False)
    loss.backward()
    assert math.isfinite(loss.item()) and "ref_logps_chosen_mean" not in metrics
    # rewards are beta x average log-prob (reference-free, length-averaged by default)
    logps, counts = model.sequence_logprobs(model.policy, batch)
    n = len(batch["chosen"])
    expected = (0.1 * logps[:n] / counts[:n]).mean().item()
    assert metrics["rewards_chosen_mean"].item() == pytest.approx(expected, rel=1e-5)


def test_reference_free_training_end_to_end(tmp_path, tiny_model_dir, pair_files):
    _, out = run(
        tmp_path,
        "simpo",
        tiny_model_dir("llama"),
        pair_files,
        "trainer.max_steps=2",
        "dpo.preference_loss=simpo",
        "dpo.ref_policy_kl_penalty=2.0",
    )
    recs = records(out, "train")
    assert sorted(recs) == [1, 2] and all(math.isfinite(r["train/loss"]) for r in recs.values())


def test_mixture_equals_weighted_parts(tiny_model_dir, tokenizer):
    model_dir = tiny_model_dir("llama")
    batch = pair_batch(tokenizer, seed=5)
    mixed = build(model_dir, "dpo.preference_loss=[dpo,hinge]", "dpo.preference_loss_weights=[0.8,0.2]")
    # move the policy away from the reference so both parts are non-trivial
    with torch.no_grad():
        for p in mixed.policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    parts = {}
    for name in ("dpo", "hinge"):
        single = build(model_dir, f"dpo.preference_loss={name}")
        single.policy.load_state_dict(mixed.policy.state_dict())
        parts[name] = single.get_loss_and_metrics(batch, forward_only=True)[0].item()
    loss = mixed.get_loss_and_metrics(batch, forward_only=True)[0].item()
    assert loss == pytest.approx(0.8 * parts["dpo"] + 0.2 * parts["hinge"], rel=1e-5)


def test_rdpo_uses_response_lengths(tiny_model_dir, tokenizer):
    model_dir = tiny_model_dir("llama")
    batch = pair_batch(tokenizer, seed=5)
    model = build(model_dir, "dpo.preference_loss=rdpo", "dpo.rdpo_alpha=0.05")
    loss = model.get_loss_and_metrics(batch, forward_only=True)[0].item()
    length_gap = (batch["chosen_length"] - batch["rejected_length"]).float()  # prompt cancels out
    expected = torch.nn.functional.softplus(0.05 * length_gap).mean().item()  # -log sigmoid(0 - a * gap)
    assert loss == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
def test_bco_running_mean_survives_resume(tmp_path, tiny_model_dir, pair_files):
    model_dir = tiny_model_dir("llama")
    common = ("dpo.preference_loss=bco_pair", "optim.sched.max_steps=4")
    _, straight = run(tmp_path, "straight", model_dir, pair_files, "trainer.max_steps=4", *common)
    run(tmp_path, "resumed", model_dir, pair_files, "trainer.max_steps=2", *common)
    _, resumed = run(tmp_path, "resumed", model_dir, pair_files, "trainer.max_steps=4", *common)
    a, b = records(straight, "train"), records(resumed, "train")
    for step in a:
        assert a[step]["train/loss"] == b[step]["train/loss"], step


def test_bco_loss_uses_the_running_mean(tiny_model_dir, tokenizer):
    """The model shifts BCO's rewards by the running mean it keeps (observed steps), pair by pair."""
    model = build(tiny_model_dir("llama"), "dpo.preference_loss=bco_pair")
    with torch.no_grad():
        for p in model.policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    batch = pair_batch(tokenizer, n=1, seed=3)  # one pair: the reward metrics are that pair's rewards
    model.observe_step_rewards(0.5, -0.1, 4)  # 8 rewards, mean 0.2
    model.observe_step_rewards(0.2, 0.0, 4)  # 8 more, mean 0.1
    delta = (0.2 * 8 + 0.1 * 8) / 16
    assert model.bco_delta.value == pytest.approx(delta)
    loss, metrics = model.get_loss_and_metrics(batch, forward_only=True)
    rc, rr = metrics["rewards_chosen_mean"].item(), metrics["rewards_rejected_mean"].item()
    assert abs(rc) > 1e-3 and abs(rr) > 1e-3
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert loss.item() == pytest.approx(-math.log(sig(rc - delta)) - math.log(sig(-(rr - delta))), rel=1e-5)


@pytest.mark.slow
def test_bco_running_mean_is_independent_of_micro_batches(tmp_path, tiny_model_dir, pair_files):
    """δ is folded in once per optimizer step from all its pairs: accumulation over micro-batches of 1 gives
    the full batch's losses and δ (folding it in per micro-batch would shift δ within a step)."""
    model_dir = tiny_model_dir("llama")
    common = ("dpo.preference_loss=bco_pair", "trainer.max_steps=4", "optim.sched.warmup_steps=0")
    _, full = run(tmp_path, "full", model_dir, pair_files, *common, "data.micro_batch_size=8")
    _, accum = run(tmp_path, "accum", model_dir, pair_files, *common, "data.micro_batch_size=1")
    a, b = records(full, "train"), records(accum, "train")
    for step in a:
        assert b[step]["train/loss"] == pytest.approx(a[step]["train/loss"], abs=1e-6), step
    deltas = [
        json.loads((out / "checkpoints/step_4/trainer_state.json").read_text())["loss_state"]["bco_delta"]
        for out in (full, accum)
    ]
    assert deltas[0]["count"] == deltas[1]["count"] == 2 * 8 * 4
    assert abs(deltas[0]["total"]) > 1e-2  # the policy moved: δ is not trivially 0
    assert deltas[1]["total"] == pytest.approx(deltas[0]["total"], rel=1e-4)
    expected = sum(a[s]["train/rewards_chosen_mean"] + a[s]["train/rewards_rejected_mean"] for s in a) * 8
    assert deltas[0]["total"] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize(
    "override, message",
    [
        ("dpo.preference_loss=dpoo", "Did you mean 'dpo'"),
        ("dpo.preference_loss=[dpo,simpo]", "cannot be mixed"),
        ("dpo.preference_loss_weights=[0.5,0.5]", "2 weights for 1 losses"),
    ],
)
def test_loss_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["model.path=m", "data.train=t", override])
