"""PEFT beyond LoRA: DoRA, continuing from an existing adapter (init_from), QLoRA's 4-bit base, and how export
merges each of them."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from preftune.cli import main
from preftune.config_checks import load_config
from preftune.errors import ConfigError
from preftune.modeling.model import DPOModel
from preftune.tools.export import export_checkpoint
from preftune.tools.tiny import build_tiny_model, save_tiny

from conftest import pair_batch, records, run

IDS = torch.tensor([[0, 5, 17, 23, 42, 8, 9]])


def dpo_config(model_dir, *overrides):
    return load_config(None, [f"model.path={model_dir}", "data.train=x", *overrides])


@pytest.fixture
def saved_adapter(tmp_path, tiny_model_dir):
    """A rank-2 adapter on q_proj/v_proj only, with non-zero B so it changes the model."""
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"))
    adapted = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(3)
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1.0)
    adapted.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def test_init_from_starts_at_base_plus_adapter_against_the_base(saved_adapter, tiny_model_dir, tokenizer):
    model_dir = tiny_model_dir("llama")
    model = DPOModel.from_config(dpo_config(model_dir, f"model.lora.init_from={saved_adapter}"))
    trainable = {n for n, p in model.policy.named_parameters() if p.requires_grad}
    assert trainable and all(("q_proj" in n or "v_proj" in n) and "lora_" in n for n in trainable)
    assert {p.shape[0] for n, p in model.policy.named_parameters() if "lora_A" in n} == {2}
    batch = pair_batch(tokenizer, seed=9)
    loss, _ = model.get_loss_and_metrics(batch, forward_only=True)
    # independently: the saved adapter on a fresh base (policy) against the plain base (reference)
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), saved_adapter).eval()
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    pi, _ = model.sequence_logprobs(policy, batch)
    ref, _ = model.sequence_logprobs(base, batch)
    n = len(batch["chosen_rewards"])
    margin = (pi[:n] - ref[:n]) - (pi[n:] - ref[n:])
    expected = -F.logsigmoid(0.1 * margin).mean()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    assert abs(loss.item() - math.log(2)) > 1e-3, "the adapter must already move step 0 off log 2"


def test_init_from_mistakes_are_one_line(tmp_path, saved_adapter, tiny_model_dir, tokenizer, capsys):
    model_dir = tiny_model_dir("llama")
    with pytest.raises(ConfigError, match="no adapter_config.json"):
        DPOModel.from_config(dpo_config(model_dir, f"model.lora.init_from={tmp_path}"))
    with pytest.raises(ConfigError, match=r"model.lora.r=8 but the adapter has r=2"):
        DPOModel.from_config(dpo_config(model_dir, f"model.lora.init_from={saved_adapter}", "model.lora.r=8"))
    with pytest.raises(ConfigError, match="use_dora=true but the adapter is plain LoRA"):
        DPOModel.from_config(
            dpo_config(model_dir, f"model.lora.init_from={saved_adapter}", "model.lora.use_dora=true")
        )
    wider = build_tiny_model("llama", len(tokenizer), hidden_size=48)  # the adapter's shapes do not fit
    other = save_tiny(wider, tokenizer, tmp_path / "wider")
    with pytest.raises(ConfigError, match="does not fit model.path"):
        DPOModel.from_config(dpo_config(other, f"model.lora.init_from={saved_adapter}"))
    with pytest.raises(ConfigError, match="model.load_in_4bit .* set model.lora.r"):
        DPOModel.from_config(dpo_config(model_dir, "model.load_in_4bit=true"))
    capsys.readouterr()
    code = main(
        ["train", "--config", "preset:llama3.1-8b-lora", f"model.path={tmp_path}/nope", "data.train=x"]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "model.path=" in err


@pytest.mark.slow
def test_init_from_trains_and_checkpoints_the_same_adapter(
    tmp_path, saved_adapter, tiny_model_dir, pair_files
):
    _, out = run(
        tmp_path,
        "cont",
        tiny_model_dir("llama"),
        pair_files,
        f"model.lora.init_from={saved_adapter}",
        "trainer.max_steps=2",
    )
    saved = json.loads((out / "checkpoints/step_2/model/adapter_config.json").read_text())
    assert saved["r"] == 2 and set(saved["target_modules"]) == {"q_proj", "v_proj"}
    steps = records(out, "train")
    assert abs(steps[1]["train/loss"] - math.log(2)) > 1e-3


@pytest.mark.slow
def test_dora_trains_and_export_merges_it(tmp_path, tiny_model_dir, pair_files):
    model_dir = tiny_model_dir("llama")
    lora = ("model.lora.r=4", "model.lora.alpha=8", "model.lora.use_dora=true", "optim.lr=2e-2")
    _, out = run(tmp_path, "dora", model_dir, pair_files, "trainer.max_steps=2", *lora)
    steps = records(out, "train")
    assert steps[1]["train/loss"] == pytest.approx(math.log(2), abs=1e-5)  # DoRA starts at the base too
    checkpoint = out / "checkpoints/step_2"
    assert json.loads((checkpoint / "model/adapter_config.json").read_text())["use_dora"] is True
    weights = load_file(checkpoint / "model/adapter_model.safetensors")
    assert any("lora_magnitude_vector" in k for k in weights)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), checkpoint / "model")
    with torch.no_grad():
        expected = adapted.eval()(IDS).logits
    export_checkpoint(checkpoint, tmp_path / "export", merge=True)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert "| adapters | DoRA r=4, merged |" in (tmp_path / "export/README.md").read_text()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_qlora_on_this_cpu_and_its_dequantised_merge(tmp_path, tiny_model_dir, tokenizer, pair_files):
    import bitsandbytes as bnb

    model_dir = tiny_model_dir("llama")
    qlora = ("model.load_in_4bit=true", "model.lora.r=4", "model.lora.alpha=8")
    model = DPOModel.from_config(dpo_config(model_dir, *qlora))
    q_proj = model.policy.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(q_proj, bnb.nn.Linear4bit) and q_proj.compute_dtype == torch.bfloat16
    state = q_proj.weight.quant_state
    assert state.quant_type == "nf4" and state.nested, "nf4 with double quantisation"
    loss, _ = model.get_loss_and_metrics(pair_batch(tokenizer, seed=9), forward_only=False)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)  # same 4-bit base with and without adapters
    loss.backward()
    with_grad = {n for n, p in model.policy.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad)

    _, out = run(tmp_path, "qlora", model_dir, pair_files, "trainer.max_steps=2", "optim.lr=2e-2", *qlora)
    checkpoint = out / "checkpoints/step_2"
    export_checkpoint(checkpoint, tmp_path / "export", merge=True)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32)
    # by hand: the 4-bit base weight de-quantised, plus (alpha / r) B A from the trained adapter
    adapter = load_file(checkpoint / "model/adapter_model.safetensors")
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    a, b = adapter[f"{prefix}.lora_A.weight"], adapter[f"{prefix}.lora_B.weight"]
    quantised = (
        AutoModelForCausalLM.from_pretrained(
            model_dir, quantization_config=model_quantisation(), dtype=torch.float32
        )
        .model.layers[0]
        .self_attn.q_proj.weight
    )
    expected = bnb.functional.dequantize_4bit(quantised.data, quantised.quant_state).float() + 2.0 * b @ a
    torch.testing.assert_close(merged.model.layers[0].self_attn.q_proj.weight, expected, atol=1e-5, rtol=0)
    original = AutoModelForCausalLM.from_pretrained(model_dir).model.layers[0].self_attn.q_proj.weight
    assert (merged.model.layers[0].self_attn.q_proj.weight - (original + 2.0 * b @ a)).abs().max() > 1e-3
    assert "4-bit NF4 base (QLoRA) de-quantised" in (tmp_path / "export/README.md").read_text()


def model_quantisation():
    from omegaconf import OmegaConf

    from preftune import config
    from preftune.modeling.peft_setup import quantization_config

    return quantization_config(
        OmegaConf.structured(config.ModelConfig(load_in_4bit=True, lora=config.LoraConfig(r=4)))
    )
