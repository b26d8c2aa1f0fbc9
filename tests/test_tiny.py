"""Tiny tokenizers and models (preftune.tools.tiny) and the demo preference set (preftune.tools.demo)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from preftune.config_checks import load_config
from preftune.tools.demo import CATEGORIES, make_preference_pairs, prepare_demo
from preftune.tools.tiny import TINY_ARCHS, build_tiny_model, save_tiny, train_tokenizer

TEXTS = [
    "List 3 fruits in lowercase, starting from A.",
    "APPLE, BANANA, CHERRY",
    "hello world, hello tokenizer",
] * 20
CHAT = ("<|im_start|>", "<|im_end|>")


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=320, extra_special_tokens=CHAT)


def test_tokenizer_special_tokens_and_bos(tokenizer):
    assert [tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token] == [
        "<bos>",
        "<eos>",
        "<pad>",
        "<unk>",
    ]
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3
    plain = tokenizer("hello world", add_special_tokens=False)["input_ids"]
    assert tokenizer("hello world")["input_ids"] == [tokenizer.bos_token_id, *plain]
    assert tokenizer.eos_token_id not in tokenizer("hello world")["input_ids"]
    assert tokenizer.decode(plain) == "hello world"
    chat = tokenizer("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)["input_ids"]
    assert chat[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert chat[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_tokenizer_round_trip_and_determinism(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in ["hello world", "from Z: PEAR, FIG", "<|im_start|>assistant\nok<|im_end|>", "ünïcode ✓"]:
        for special in (True, False):
            assert (
                loaded(text, add_special_tokens=special)["input_ids"]
                == tokenizer(text, add_special_tokens=special)["input_ids"]
            )
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    again = train_tokenizer(TEXTS, vocab_size=320, extra_special_tokens=CHAT)
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_model_forward_save_reload(arch, tokenizer, tmp_path):
    model = build_tiny_model(arch, len(tokenizer)).eval()
    assert model.dtype == torch.float32
    ids = torch.randint(4, len(tokenizer), (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (2, 24, len(tokenizer))
    twin = build_tiny_model(arch, len(tokenizer)).eval()
    with torch.no_grad():
        assert torch.equal(twin(input_ids=ids).logits, logits)
    out = save_tiny(model, tokenizer, tmp_path / arch)
    assert (out / "model.safetensors").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, logits, rtol=0, atol=0)
    assert AutoTokenizer.from_pretrained(out)("hello")["input_ids"] == tokenizer("hello")["input_ids"]


def test_tiny_model_family_traits():
    tied = {arch: build_tiny_model(arch, 300).config.tie_word_embeddings for arch in TINY_ARCHS}
    assert tied == {
        "llama": False,
        "qwen2": True,
        "qwen3": False,
        "mistral": False,
        "gemma2": True,
        "gpt2": True,
    }
    gemma2 = build_tiny_model("gemma2", 300).config
    assert gemma2.final_logit_softcapping and gemma2.attn_logit_softcapping
    assert "sliding_attention" in gemma2.layer_types and gemma2.sliding_window == 16
    gpt2 = build_tiny_model("gpt2", 300).config
    assert gpt2.resid_pdrop > 0 and gpt2.attn_pdrop > 0
    assert build_tiny_model("qwen2", 300).model.layers[0].self_attn.q_proj.bias is not None
    with pytest.raises(ValueError, match="llama"):
        build_tiny_model("bert", 300)


def test_mistral_sliding_window_changes_late_positions():
    windowed = build_tiny_model("mistral", 300).eval()
    assert windowed.config.sliding_window == 16
    full = build_tiny_model("mistral", 300, sliding_window=None).eval()
    ids = torch.randint(4, 300, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (windowed(input_ids=ids).logits - full(input_ids=ids).logits).abs().amax(-1)[0]
    assert diff[:16].max() == 0 and diff[16:].min() > 0


def check_pair(prompt: str, response: str) -> bool:
    """Whether `response` follows `prompt`: an independent re-reading of the instruction."""
    n = int(next(word for word in prompt.split() if word.isdigit()))
    upper = any(word in prompt for word in ("UPPER", "upper", "capital"))
    descending = any(word in prompt for word in ("reverse", "from Z", "descending"))
    category = next(name for name in CATEGORIES if name in prompt)
    items = response.split(", ")
    return (
        len(items) == n
        and all(item == (item.upper() if upper else item.lower()) for item in items)
        and items == sorted(items, reverse=descending)
        and all(item.lower() in CATEGORIES[category] for item in items)
    )


def test_preference_pairs_follow_the_rule():
    pairs = make_preference_pairs(300, seed=3)
    assert pairs == make_preference_pairs(300, seed=3)
    assert pairs != make_preference_pairs(300, seed=4)
    assert len({(p["prompt"], p["chosen_response"]) for p in pairs}) == 300
    for p in pairs:
        assert set(p) == {
            "prompt",
            "chosen_response",
            "rejected_response",
            "chosen_reward",
            "rejected_reward",
        }
        assert check_pair(p["prompt"], p["chosen_response"])
        assert not check_pair(p["prompt"], p["rejected_response"])
    # the rule needs the prompt: both cases and both orders are chosen somewhere
    chosen = [p["chosen_response"] for p in pairs]
    assert any(c.isupper() for c in chosen) and any(c.islower() for c in chosen)


def test_prepare_demo_writes_loadable_files(tmp_path):
    paths = prepare_demo(tmp_path / "demo", n_train=64, n_val=16, seed=0)
    train = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    val = [json.loads(line) for line in paths["validation"].read_text().splitlines()]
    assert len(train) == 64 and set(train[0]) >= {"prompt", "chosen_response", "rejected_response"}
    assert len(val) == 16 and set(val[0]) == {"prompt", "chosen", "rejected"}
    assert not {(r["prompt"], r["chosen"]) for r in val} & {
        (r["prompt"], r["chosen_response"]) for r in train
    }
    tokenizer = AutoTokenizer.from_pretrained(paths["model"])
    model = AutoModelForCausalLM.from_pretrained(paths["model"])
    assert model.config.model_type == "llama" and model.config.vocab_size == len(tokenizer)
    cfg = load_config(paths["config"])  # only keys preftune knows
    assert cfg.model.path == str(paths["model"]) and cfg.data.train == str(paths["train"])
    assert cfg.output_dir == str(tmp_path.resolve() / "demo" / "run")
