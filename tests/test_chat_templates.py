"""The chat templates shipped by name (data.chat_template=chatml, ...): each renders its published format
exactly, and on multi-turn data keeps the prompt an exact prefix with one end-of-turn token per response."""

from __future__ import annotations

import json
import random

import pytest

from preftune.data.batch import dpo_custom_collate
from preftune.data.chat import NAMED_TEMPLATES, NO_TEMPLATE, load_chat_template
from preftune.data.dataset import PreferenceDataset
from preftune.errors import DataError
from preftune.tools.tiny import train_tokenizer

SPECIALS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<start_of_turn>",
    "<end_of_turn>",
)
WORDS = "the a cat dog bird red blue runs sits sleeps hello sure no yes and be brief".split()
SYSTEM, USER_1, REPLY_1, USER_2 = "be brief", "hello cat", "yes the dog runs", "and the red bird?"
CHOSEN, REJECTED = "sure the red bird sits", "no"
PROMPT = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": USER_1},
    {"role": "assistant", "content": REPLY_1},
    {"role": "user", "content": USER_2},
]
# The published formats, written out by hand for PROMPT + the chosen reply (the tiny tokenizer's BOS and EOS
# are <bos> and <eos>).
EXPECTED = {
    "chatml": "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhello cat<|im_end|>\n"
    "<|im_start|>assistant\nyes the dog runs<|im_end|>\n<|im_start|>user\nand the red bird?<|im_end|>\n"
    "<|im_start|>assistant\nsure the red bird sits<|im_end|>\n",
    "llama3": "<bos><|start_header_id|>system<|end_header_id|>\n\nbe brief<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nhello cat<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nyes the dog runs<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nand the red bird?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nsure the red bird sits<|eot_id|>",
    "zephyr": "<|system|>\nbe brief<eos>\n<|user|>\nhello cat<eos>\n<|assistant|>\nyes the dog runs<eos>\n"
    "<|user|>\nand the red bird?<eos>\n<|assistant|>\nsure the red bird sits<eos>\n",
    "mistral": "<bos>[INST] be brief\n\nhello cat [/INST]yes the dog runs<eos>[INST] and the red bird? [/INST]"
    "sure the red bird sits<eos>",
    "gemma": "<bos><start_of_turn>user\nbe brief\n\nhello cat<end_of_turn>\n<start_of_turn>model\n"
    "yes the dog runs<end_of_turn>\n<start_of_turn>user\nand the red bird?<end_of_turn>\n"
    "<start_of_turn>model\nsure the red bird sits<end_of_turn>\n",
}
EXPECTED["qwen"] = EXPECTED["chatml"]  # a system message given: Qwen's is ChatML
END = {
    "chatml": "<|im_end|>",
    "qwen": "<|im_end|>",
    "llama3": "<|eot_id|>",
    "zephyr": "<eos>",
    "mistral": "<eos>",
    "gemma": "<end_of_turn>",
}
WRITES_BOS = {"llama3", "mistral", "gemma"}


@pytest.fixture(scope="module")
def tok():
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(300)]
    return train_tokenizer(texts, vocab_size=320, extra_special_tokens=SPECIALS)


def decode(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def render(tok, name: str, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tok.apply_chat_template(
        messages,
        chat_template=load_chat_template(name),
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )


def test_every_name_is_shipped_and_tested():
    assert set(NAMED_TEMPLATES) == set(EXPECTED) == set(END)
    for name in NAMED_TEMPLATES:
        assert "{%" in load_chat_template(name)


@pytest.mark.parametrize("name", NAMED_TEMPLATES)
def test_named_template_renders_the_published_format(tok, name):
    assert render(tok, name, [*PROMPT, {"role": "assistant", "content": CHOSEN}]) == EXPECTED[name]


@pytest.mark.parametrize("name", NAMED_TEMPLATES)
def test_named_template_exact_prefix_and_one_end_of_turn(tmp_path, tok, name):
    rows = [
        {
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": CHOSEN}],
            "rejected": [{"role": "assistant", "content": REJECTED}],
        }
        for prompt in (PROMPT, PROMPT[1:])  # with and without a system message
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = PreferenceDataset(path, tok, 512, chat_template=name)
    assert len(ds) == 2 and ds.stats.format == "trl_conversational" and not ds.stats.dropped
    end_id = tok.convert_tokens_to_ids(END[name])
    for ex, prompt in zip(ds, (PROMPT, PROMPT[1:]), strict=True):
        assert decode(tok, ex["prompt_ids"]) == render(tok, name, prompt, add_generation_prompt=True)
        batch = dpo_custom_collate([ex], eos_id=tok.eos_token_id)
        for side, content in (("chosen", CHOSEN), ("rejected", REJECTED)):
            n = int(batch[f"{side}_length"][0])
            seq, labels = batch[side][0, :n].tolist(), batch[f"{side}_labels"][0, :n].tolist()
            trained = [t for t, lab in zip(seq, labels, strict=True) if lab != -100]
            assert seq[: len(ex["prompt_ids"])] == ex["prompt_ids"]  # the prompt is an exact prefix
            assert decode(tok, trained) == content + END[name]  # the final turn and its end token only
            assert trained.count(end_id) == 1 and trained[-1] == end_id
            full = render(tok, name, [*prompt, {"role": "assistant", "content": content}])
            assert full.startswith(decode(tok, seq)) and full[len(decode(tok, seq)) :] in ("", "\n")
            assert USER_1 in decode(tok, ex["prompt_ids"]) and REPLY_1 in decode(tok, ex["prompt_ids"])
            assert (SYSTEM in decode(tok, seq)) == (prompt is PROMPT)
            assert seq.count(tok.bos_token_id) == (1 if name in WRITES_BOS else 0)


def test_qwen_adds_its_default_system_message(tok):
    text = render(tok, "qwen", PROMPT[1:2], add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nhello cat<|im_end|>\n<|im_start|>assistant\n"
    )


def test_no_template_error_names_the_shipped_templates(tmp_path, tok):
    path = tmp_path / "chat.jsonl"
    row = {
        "prompt": PROMPT,
        "chosen": [{"role": "assistant", "content": CHOSEN}],
        "rejected": [{"role": "assistant", "content": REJECTED}],
    }
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError) as info:
        PreferenceDataset(path, tok, 512)
    assert str(info.value) == f"{path}:1: {NO_TEMPLATE}"
    assert all(name in NO_TEMPLATE for name in NAMED_TEMPLATES) and "chatml.jinja" not in NO_TEMPLATE
    with pytest.raises(DataError, match="shipped templates: chatml, gemma, llama3"):
        load_chat_template("chatlm")
