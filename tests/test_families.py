"""Every model family packs and shares the prompt exactly: tiny random configs of each, built locally.

For each family: the step-0 loss is log 2; packed and shared-prompt log-probs (segment-wise attention and an
explicit eager mask), losses and gradients equal the plain padded path under the family's own eager attention
(1e-5, fp32); the plain path's log-probs equal the model's own logits. MoE families add the router's balancing
loss, the same in every layout and equal to transformers' own with the padding masked out.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import random
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from preftune.cli import main
from preftune.config_checks import load_config
from preftune.data.batch import Block, MicroBatch, dpo_custom_collate, micro_batch_from_padded
from preftune.data.packing import build_packed_collate
from preftune.data.visibility import VARLEN
from preftune.data.windows import layer_windows
from preftune.errors import ConfigError
from preftune.losses import LossSettings
from preftune.modeling.layout_check import check_layout, layout_error
from preftune.modeling.logprobs import SequenceLogprobs
from preftune.modeling.model import DPOModel, disable_dropout
from preftune.modeling.parallel import _blocks
from preftune.modeling.reference import FrozenReference
from preftune.modeling.router import GlobalRouting, router_loss
from preftune.tools.tiny import save_tiny

from conftest import records, run

VOCAB, WINDOW, EOS = 96, 8, 1
SIZES = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=128, initializer_range=0.1,
             bos_token_id=0, eos_token_id=EOS, pad_token_id=2)  # fmt: skip
MOE = dict(num_experts_per_tok=2, router_aux_loss_coef=0.5)
SLIDING = dict(sliding_window=WINDOW)
# model_type -> config kwargs beyond SIZES; each comment names what the family adds to the layout's traps
FAMILIES = {
    "llama": {},
    "mistral": SLIDING,  # every layer sliding
    "qwen2": dict(SLIDING, use_sliding_window=True, max_window_layers=1),  # full then sliding layers
    "qwen3": {},  # q/k norm
    "gemma2": dict(SLIDING, query_pre_attn_scalar=8, attn_logit_softcapping=2.0, final_logit_softcapping=5.0),
    "gemma3_text": dict(SLIDING, layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=8),
    "phi3": SLIDING,  # fused qkv, partial rotary
    "phi": dict(partial_rotary_factor=0.5),  # parallel attention/MLP, biased head
    "olmo2": {},  # q/k norm after the projections, post-norms
    "granite": dict(attention_multiplier=0.2, logits_scaling=4.0, embedding_multiplier=3.0, residual_multiplier=0.5),
    "cohere": dict(logit_scale=0.5),  # scaled logits, parallel residual
    "starcoder2": SLIDING,  # biased LayerNorm model, every layer sliding
    "gpt_neox": dict(partial_rotary_factor=0.25, use_parallel_residual=True),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_inner=64, n_positions=128),  # learned positions
    "smollm3": dict(no_rope_layers=[1, 0]),  # the second layer has no rotary embedding
    # decoder layers that drop the extra keywords on the way to the attention; partial rotary
    "stablelm": dict(qk_layernorm=True, use_qkv_bias=True, use_parallel_residual=True),  # per-head q/k norm
    "nemotron": {},  # LayerNorm1P (weight + 1), squared-ReLU MLP
    "mixtral": dict(**MOE, **SLIDING, num_local_experts=4),
    "qwen3_moe": dict(MOE, num_experts=4, moe_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[]),
    "gpt_oss": dict(**MOE, **SLIDING, num_local_experts=4, layer_types=["sliding_attention", "full_attention"]),
}  # fmt: skip
LAYOUTS = {"packed": (True, False), "shared": (False, True), "packed+shared": (True, True)}
# (prompt, chosen, rejected): one-token and empty edges, then sequences longer than the window
LENGTHS = [(1, 1, 1), (0, 3, 12), (10, 1, 1), (6, 12, 9), (4, 14, 5)]


@functools.cache
def family_model(model_type: str) -> PreTrainedModel:
    """The family's seeded random fp32 model (eager attention, no dropout), shared by the tests."""
    config = AutoConfig.for_model(model_type, **{**SIZES, **FAMILIES[model_type]})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    disable_dropout(model)
    return model.eval()


@functools.cache
def dpo_cfg() -> dict:
    return OmegaConf.to_container(load_config(None, ["model.path=unused", "data.train=unused"]).dpo)


def dpo_model(policy: PreTrainedModel, reference: PreTrainedModel, **dpo) -> DPOModel:
    model = DPOModel(
        policy, FrozenReference(SequenceLogprobs(reference)), LossSettings.from_config({**dpo_cfg(), **dpo})
    )
    model.policy_runner.router = router_loss(policy.config, None)
    return model.train(False)


@functools.cache
def trained(model_type: str) -> DPOModel:
    """A policy moved away from its reference (the family's model), so rewards and gradients are not zero."""
    reference = family_model(model_type)
    policy = copy.deepcopy(reference)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return dpo_model(policy, reference, sft_loss_weight=0.5)


def pairs(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [
        {"prompt_ids": [rng.randrange(3, VOCAB) for _ in range(p)],
         "chosen_ids": [rng.randrange(3, VOCAB) for _ in range(c)],
         "rejected_ids": [rng.randrange(3, VOCAB) for _ in range(r)],
         "chosen_reward": 1.0, "rejected_reward": 0.0, "index": i}
        for i, (p, c, r) in enumerate(LENGTHS)
    ]  # fmt: skip


def laid_out(model: DPOModel, layout: str, exs: list[dict], attention: str) -> MicroBatch:
    """The pairs as one packed and/or shared-prompt micro-batch under ``attention``."""
    use_attention(model, attention)
    pack, share = LAYOUTS[layout]
    collate = build_packed_collate(eos_id=EOS, model_config=model.policy.config, attn_implementation=attention,
                                   pack=pack, share_prompt=share, max_tokens_per_row=64, rows_per_micro_batch=99)  # fmt: skip
    (batch,) = collate(exs)
    return batch


def in_pair_order(batch: MicroBatch, values: torch.Tensor) -> torch.Tensor:
    order = torch.cat([batch.indices, batch.indices + batch.num_pairs])
    out = torch.empty_like(values)
    out[order] = values
    return out


def use_attention(model: DPOModel, attention: str) -> None:
    """Policy and reference: one attention implementation (a run loads both with the same)."""
    for lm in (model.policy, model.reference.model):
        lm.set_attn_implementation(attention)


def plain_logprobs(model: DPOModel, exs: list[dict]) -> torch.Tensor:
    use_attention(model, "eager")
    with torch.no_grad():
        return model.policy_logprobs(micro_batch_from_padded(dpo_custom_collate(exs, EOS)))[0]


def loss_and_grads(model: DPOModel, batch: dict) -> tuple[torch.Tensor, dict, list[torch.Tensor]]:
    model.policy.zero_grad(set_to_none=True)
    loss, metrics = model.get_loss_and_metrics(batch, forward_only=False)
    loss.backward()
    return loss.detach(), metrics, [p.grad.clone() for p in model.policy.parameters()]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_step0_loss_is_log2(model_type):
    model = family_model(model_type)
    dpo = dpo_model(model, copy.deepcopy(model))
    loss, metrics = dpo.get_loss_and_metrics(dpo_custom_collate(pairs(), EOS), forward_only=True)
    assert metrics["preference_loss"].item() == pytest.approx(math.log(2), abs=1e-6)
    coef = model.config.router_aux_loss_coef if "router_aux_loss_coef" in FAMILIES[model_type] else 0.0
    assert ("aux_loss" in metrics) == (coef > 0)
    aux = metrics["aux_loss"].item() if coef else 0.0
    assert loss.item() == pytest.approx(math.log(2) + coef * aux, abs=1e-6)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_logprobs_match_plain(model_type):
    """Packed / shared-prompt log-probs (segment-wise and eager-masked) equal the plain path's, which equal
    the model's own full-vocabulary logits; removing the isolation changes them (the test is sensitive)."""
    model, exs = trained(model_type), pairs()
    plain = plain_logprobs(model, exs)
    with torch.no_grad():  # independent path: each sequence alone through the causal LM's own head
        for i, ex in enumerate(exs):
            for side, seq in ((0, i), (1, len(exs) + i)):
                response = ex["chosen_ids"] if side == 0 else ex["rejected_ids"]
                ids = torch.tensor([ex["prompt_ids"] + response])
                logits = model.policy(ids).logits[0].log_softmax(-1)
                first = max(len(ex["prompt_ids"]), 1)
                expected = logits[first - 1 : -1].gather(1, ids[0, first:, None]).sum()
                torch.testing.assert_close(plain[seq], expected, rtol=1e-6, atol=1e-5)
    for layout, attention in [*((layout, VARLEN) for layout in LAYOUTS), ("packed+shared", "eager")]:
        batch = laid_out(model, layout, exs, attention)
        with torch.no_grad():
            logps = in_pair_order(batch, model.policy_logprobs(batch)[0])
        torch.testing.assert_close(logps, plain, rtol=1e-6, atol=1e-5, msg=f"{layout} {attention}")
    use_attention(model, VARLEN)
    assert layout_error(model, pack=True, share_prompt=True) is None  # the run's self-check passes
    batch = laid_out(model, "packed+shared", exs, VARLEN)
    one_block = dataclasses.replace(batch, attention_blocks=(Block(0, 0, 0, 0, batch.input_ids.shape[1]),))
    with torch.no_grad():
        mixed = in_pair_order(batch, model.policy_logprobs(one_block)[0])
    assert (mixed - plain).abs().max() > 1e-3


@pytest.mark.parametrize("model_type", FAMILIES)
def test_loss_and_gradients_match_plain(model_type):
    """One packed + shared-prompt micro-batch against the padded one: loss (the router's balancing loss
    included), metrics and every parameter's gradient."""
    model, exs = trained(model_type), pairs()
    use_attention(model, "eager")
    plain_loss, plain_metrics, plain_grads = loss_and_grads(model, dpo_custom_collate(exs, EOS))
    packed_loss, packed_metrics, packed_grads = loss_and_grads(
        model, laid_out(model, "packed+shared", exs, VARLEN)
    )
    assert packed_loss.item() == pytest.approx(plain_loss.item(), abs=1e-5)
    assert plain_metrics.keys() == packed_metrics.keys()
    for key, value in plain_metrics.items():
        torch.testing.assert_close(packed_metrics[key], value, rtol=1e-5, atol=1e-5, msg=key)
    assert any(g.abs().max() > 1e-3 for g in plain_grads)
    names = [name for name, _ in model.policy.named_parameters()]
    for name, packed, plain in zip(names, packed_grads, plain_grads, strict=True):
        torch.testing.assert_close(packed, plain, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_router_loss_is_transformers_without_padding(model_type):
    """The balancing loss equals transformers' load_balancing_loss_func given the padded rows' real-token
    mask; the reference never adds one; the coefficient comes from the model config unless set, 0 is off."""
    model, exs = trained(model_type), pairs()
    batch = dpo_custom_collate(exs, EOS)
    use_attention(model, "eager")
    _, metrics = model.get_loss_and_metrics(batch, forward_only=True)
    ids = torch.cat([batch["chosen"], batch["rejected"]])
    with torch.no_grad():
        out = model.policy.base_model(input_ids=ids, output_router_logits=True)
    config = model.policy.config
    experts = getattr(config, "num_local_experts", None) or config.num_experts
    expected = load_balancing_loss_func(
        out.router_logits, experts, config.num_experts_per_tok, batch["attention_mask"]
    )
    torch.testing.assert_close(metrics["aux_loss"], expected)
    unmasked = load_balancing_loss_func(out.router_logits, experts, config.num_experts_per_tok)
    assert (unmasked - expected).abs() > 1e-4  # padding would change it
    assert model.reference.runner.router is None
    assert router_loss(config, None).coef == 0.5 and router_loss(config, 0.0) is None
    assert router_loss(config, 0.1).coef == 0.1
    with pytest.raises(ConfigError, match="llama model has no router"):
        router_loss(family_model("llama").config, 0.1)
    # FSDP2 shards each transformer block; the experts live inside them
    blocks = _blocks(model.policy)
    experts_params = [n for n, _ in model.policy.named_parameters() if "experts" in n]
    inside = {id(p) for block in blocks for p in block.parameters()}
    assert experts_params and all(
        id(p) in inside for n, p in model.policy.named_parameters() if "experts" in n
    )


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_global_balancing_splits_exactly(model_type):
    """Global-batch scope on one padded batch cut into micro-batches of 2, 2 and 1 pairs: each one's
    balancing loss is the whole batch's, and their gradients, weighted by their share of the pairs as the
    trainer weights them, add up to the whole batch's (plain autograd); per micro-batch they do not."""
    model, exs = trained(model_type), pairs()
    use_attention(model, "eager")
    runner = model.policy_runner

    def aux_and_grads(batch: MicroBatch, weight: float = 1.0) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.policy_logprobs(batch)
        (runner.aux_loss * weight).backward()
        grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.policy.parameters()]
        return runner.aux_loss.detach(), grads

    model.policy.zero_grad(set_to_none=True)
    whole, whole_grads = aux_and_grads(micro_batch_from_padded(dpo_custom_collate(exs, EOS)))
    assert max(g.abs().max().item() for g in whole_grads) > 1e-3
    parts = [micro_batch_from_padded(dpo_custom_collate(part, EOS)) for part in (exs[:2], exs[2:4], exs[4:])]
    statistics = [model.routing_statistics(part) for part in parts]
    total = statistics[0] + statistics[1] + statistics[2]
    for scope, routing in (("global", GlobalRouting(total, len(exs))), ("micro", None)):
        model.policy.zero_grad(set_to_none=True)
        with model.global_routing(routing):
            values = [aux_and_grads(part, part.num_pairs / len(exs)) for part in parts]
        grads = values[-1][1]
        if scope == "global":
            for value, _ in values:
                torch.testing.assert_close(value, whole, rtol=0, atol=1e-6)
            for grad, expected in zip(grads, whole_grads, strict=True):
                torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7)
        else:
            assert max((value - whole).abs().item() for value, _ in values) > 1e-3
            assert max((g - e).abs().max().item() for g, e in zip(grads, whole_grads, strict=True)) > 1e-5
    assert runner.global_routing is None


def test_windows_read_from_config():
    assert layer_windows(family_model("llama").config) == [None, None]
    assert layer_windows(family_model("mistral").config) == [WINDOW, WINDOW]
    assert layer_windows(family_model("qwen2").config) == [None, WINDOW]
    assert layer_windows(family_model("gpt_oss").config) == [WINDOW, None]
    bidirectional = AutoConfig.for_model("gemma3_text", **SIZES, use_bidirectional_attention=True)
    with pytest.raises(ConfigError, match="gemma3_text model is bidirectional"):
        layer_windows(bidirectional)
    chunked = AutoConfig.for_model("qwen3", **SIZES, layer_types=["chunked_attention", "full_attention"])
    with pytest.raises(ConfigError, match="layer type 'chunked_attention'"):
        layer_windows(chunked)


def test_self_check_passes_caches_and_refuses(tmp_path, tokenizer):
    """The self-check on a saved model: passes, is cached by fingerprint, and refuses a model whose attention
    ignores the layout (custom code attending over the whole row), with one line."""
    model_dir = save_tiny(family_model("gpt_oss"), tokenizer, tmp_path / "model")
    cfg = load_config(None, [f"model.path={model_dir}", "data.train=unused", "data.packing=true",
                             "data.share_prompt=true"])  # fmt: skip
    model = DPOModel.from_config(cfg)
    kwargs = dict(pack=True, share_prompt=True, model_path=model_dir, dtype="float32")
    assert check_layout(model, **kwargs, cache_dir=tmp_path / "cache") is False
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1
    assert check_layout(model, **kwargs, cache_dir=tmp_path / "cache") is True
    attention = model.policy.model.layers[1].self_attn
    original = attention.forward

    def whole_row(hidden_states, *args, **kwargs):  # ignores the blocks, as custom attention code would
        kwargs.pop("attention_blocks", None)
        return original(hidden_states, *args, **kwargs)

    attention.forward = whole_row
    with pytest.raises(
        ConfigError, match=r"not exact for this gpt_oss model: pair \d's \w+ log-prob"
    ) as error:
        check_layout(model, **kwargs, cache_dir=None)
    assert "\n" not in str(error.value)


def saved_family(model_type: str, tokenizer, directory) -> Path:
    """The family's seeded random model at the tokenizer's vocabulary size, saved with it in ``directory``."""
    config = AutoConfig.for_model(
        model_type, **{**SIZES, **FAMILIES[model_type], "vocab_size": len(tokenizer)}
    )
    torch.manual_seed(0)
    return save_tiny(AutoModelForCausalLM.from_config(config), tokenizer, directory)


@pytest.mark.slow
def test_moe_trains_packed_like_plain(tmp_path, tokenizer, pair_files):
    """gpt-oss (sinks, sliding layers, experts) trained packed with a shared prompt follows the padded run,
    the router's balancing loss logged as aux_loss; the self-check's pass is cached with the run."""
    model_dir = saved_family("gpt_oss", tokenizer, tmp_path / "model")
    common = ("trainer.max_steps=2", "optim.eps=1e-4", "data.micro_batch_size=8")  # one micro-batch a step
    _, padded = run(tmp_path, "padded", model_dir, pair_files, *common)
    layout = ("data.packing=true", "data.share_prompt=true", "data.pack_length=512")
    _, packed = run(tmp_path, "packed", model_dir, pair_files, *common, *layout)
    a, b = records(padded, "train"), records(packed, "train")
    for step in a:
        assert a[step]["train/aux_loss"] > 0
        for key in ("train/loss", "train/aux_loss", "train/preference_loss", "train/grad_norm"):
            assert b[step][key] == pytest.approx(a[step][key], abs=1e-5), (step, key)
    assert len(list((packed / "cache" / "layout_check").glob("*.json"))) == 1


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_global_batch_balancing_is_layout_independent(model_type, tmp_path, tokenizer, pair_files):
    """``model.router_aux_loss_scope=global_batch``: two steps as one padded micro-batch (the global batch's
    loss straight through autograd, no statistics pass), as padded micro-batches of 2 pairs, packed rows one
    per micro-batch, and shared-prompt micro-batches give the same loss, balancing loss and gradient norm
    (1e-5), so the same weights; per micro-batch (transformers' way) the balancing loss differs."""
    model_dir = saved_family(model_type, tokenizer, tmp_path / "model")
    common = ("trainer.max_steps=2", "optim.eps=1e-4", "trainer.val_check_interval=2")
    layouts = {
        "whole": ("data.micro_batch_size=8",),
        "padded": ("data.micro_batch_size=2",),
        "packed": ("data.micro_batch_size=1", "data.packing=true", "data.pack_length=96"),
        "shared": ("data.micro_batch_size=2", "data.share_prompt=true"),
        "per micro-batch": ("data.micro_batch_size=2", "model.router_aux_loss_scope=micro_batch"),
    }
    runs = {
        name: run(tmp_path, name, model_dir, pair_files, *common, *extra)[1]
        for name, extra in layouts.items()
    }
    whole = records(runs["whole"], "train")
    assert whole[1]["train/aux_loss"] > 1
    for name in ("padded", "packed", "shared"):
        got = records(runs[name], "train")
        for step in (1, 2):
            for key in ("train/loss", "train/aux_loss", "train/preference_loss", "train/grad_norm"):
                assert got[step][key] == pytest.approx(whole[step][key], abs=1e-5), (name, step, key)
        val = records(runs[name], "val")[2]["val/aux_loss"]
        assert val == pytest.approx(records(runs["whole"], "val")[2]["val/aux_loss"], abs=1e-5), name
    per_micro_batch = records(runs["per micro-batch"], "train")[1]["train/aux_loss"]
    assert abs(per_micro_batch - whole[1]["train/aux_loss"]) > 1e-4


def test_cli_refuses_an_unroutable_family_in_one_line(tmp_path, tokenizer, pair_files, capsys):
    """A bidirectional model with packing: exit 2 and one line, before any training."""
    config = AutoConfig.for_model("gemma3_text", **{**SIZES, "vocab_size": len(tokenizer)},
                                  use_bidirectional_attention=True)  # fmt: skip
    model_dir = save_tiny(AutoModelForCausalLM.from_config(config), tokenizer, tmp_path / "model")
    config_file = tmp_path / "run.yaml"
    config_file.write_text(
        f"model:\n  path: {model_dir}\ndata:\n  train: {pair_files['train']}\n  packing: true\n"
    )
    assert main(["train", "--config", str(config_file), f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("preftune: error:")]
    assert (
        "Traceback" not in err
        and "gemma3_text model is bidirectional" in line
        and "data.packing=false" in line
    )
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
