"""Chat templates on a locally trained tokenizer: a ChatML-style template and a Llama-3-style header template
that writes BOS itself. Labels must cover exactly the final assistant turn plus its end token."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
from tokenizers import processors

from preftune.data.batch import dpo_custom_collate
from preftune.data.chat import BAD_END, BROKEN_PREFIX
from preftune.data.dataset import PreferenceDataset
from preftune.errors import DataError
from preftune.tools.tiny import EOS_ID, train_tokenizer

SPECIALS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
    "{{ m.content | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
END = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}
# Rewrites the last message (trims it): the prompt ends with the user turn, the full conversation does not,
# so a user turn with trailing spaces renders differently in the two and breaks the prefix property.
TRIM_LAST = CHATML.replace(
    "{{ m.content }}", "{% if loop.last %}{{ m.content | trim }}{% else %}{{ m.content }}{% endif %}"
)
NO_SYSTEM = (
    "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PLAIN = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
WORDS = "the a cat dog bird red blue runs sits sleeps hello sure no yes and be brief user assistant system".split()

PROMPT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hello cat"},
    {"role": "assistant", "content": "yes the dog runs"},
    {"role": "user", "content": "and the red bird?"},
]
CHOSEN = "sure the red bird sits"
REJECTED = "no"


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def build_tokenizer(template: str, llama3: bool = False):
    rng = random.Random(0)
    tok = train_tokenizer(
        [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(300)],
        vocab_size=320,
        extra_special_tokens=SPECIALS,
    )
    if llama3:  # BOS is <|begin_of_text|>, added by the tokenizer and written by the template
        bos_id = tok.convert_tokens_to_ids("<|begin_of_text|>")
        tok.bos_token = "<|begin_of_text|>"
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos_id)]
        )
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module", params=["chatml", "llama3"])
def chat_tok(request):
    name = request.param
    return name, build_tokenizer(CHATML if name == "chatml" else LLAMA3, llama3=name == "llama3")


def records(fmt: str, prompt=PROMPT, chosen=CHOSEN, rejected=REJECTED) -> dict:
    if fmt == "trl_conversational":
        return {
            "prompt": prompt,
            "chosen": [msg("assistant", chosen)],
            "rejected": [msg("assistant", rejected)],
        }
    if fmt == "trl_implicit":
        return {
            "chosen": [*prompt, msg("assistant", chosen)],
            "rejected": [*prompt, msg("assistant", rejected)],
        }
    completions = [
        {"rank": 1, "completion": [msg("assistant", rejected)]},
        {"rank": 0, "completion": [msg("assistant", chosen)]},
    ]
    return {"context": prompt, "completions": completions}


def dump(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def decode(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("fmt", ["trl_conversational", "trl_implicit", "nemo_rl"])
def test_labels_are_exactly_the_final_turn_and_its_end_token(tmp_path, chat_tok, fmt):
    name, tok = chat_tok
    ds = PreferenceDataset(dump(tmp_path / "c.jsonl", [records(fmt)]), tok, 512)
    assert ds.stats.format == fmt and len(ds) == 1
    ex = ds[0]
    batch = dpo_custom_collate([ex], eos_id=tok.eos_token_id)
    end_id = tok.convert_tokens_to_ids(END[name])
    prompt_text = tok.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    assert decode(tok, ex["prompt_ids"]) == prompt_text
    for side, content in (("chosen", CHOSEN), ("rejected", REJECTED)):
        n = int(batch[f"{side}_length"][0])
        seq, labels = batch[side][0, :n].tolist(), batch[f"{side}_labels"][0, :n].tolist()
        trained = [t for t, lab in zip(seq, labels, strict=True) if lab != -100]
        assert decode(tok, trained) == content + END[name]  # the final turn + its end token, nothing else
        assert labels[: len(ex["prompt_ids"])] == [-100] * len(ex["prompt_ids"])
        assert seq[: len(ex["prompt_ids"])] == ex["prompt_ids"]  # exact prefix
        assert trained == ex[f"{side}_ids"] and trained.count(end_id) == 1 and trained[-1] == end_id
        full_text = tok.apply_chat_template([*PROMPT, msg("assistant", content)], tokenize=False)
        assert full_text.startswith(decode(tok, seq))  # the rendered conversation, up to the end token
        assert full_text[len(decode(tok, seq)) :] in ("", "\n")  # only the template's trailing newline left
        assert "yes the dog runs" in decode(tok, seq[: len(ex["prompt_ids"])])  # earlier turns are prompt
        assert "be brief" in decode(tok, seq)  # the system message is kept
    if name == "llama3":
        bos = tok.bos_token_id
        assert ex["prompt_ids"][0] == bos and (ex["prompt_ids"] + ex["chosen_ids"]).count(bos) == 1
        assert tok(prompt_text)["input_ids"][:2] == [bos, bos]  # what a naive tokenization would do
    else:
        assert tok.bos_token_id not in ex["prompt_ids"]  # the template writes no BOS, so none is added
        assert ex["prompt_ids"][0] == tok.convert_tokens_to_ids("<|im_start|>")


def test_every_conversational_format_gives_the_same_tokens(tmp_path, chat_tok):
    _, tok = chat_tok
    examples = [
        list(PreferenceDataset(dump(tmp_path / f"{fmt}.jsonl", [records(fmt)]), tok, 512).examples)
        for fmt in ("trl_conversational", "trl_implicit", "nemo_rl")
    ]
    assert examples[0] == examples[1] == examples[2]


def test_prompts_are_the_datas_own(tmp_path, chat_tok):
    """``PreferenceDataset.prompts``: each pair's prompt as its record gives it (the messages before the final
    turn, as a judge gets them), read again from the file, for every conversational format and a plain one,
    also after a tied record (no pair) and through a column mapping."""
    _, tok = chat_tok
    other = [msg("user", "the dog sits")]
    for fmt in ("trl_conversational", "trl_implicit", "nemo_rl"):
        path = dump(tmp_path / f"p-{fmt}.jsonl", [records(fmt), records(fmt, prompt=other)])
        assert PreferenceDataset(path, tok, 512).prompts(2) == [PROMPT, other]
    tied = {"context": other, "completions": [{"rank": 0, "completion": [msg("assistant", "a")]}] * 2}
    path = dump(tmp_path / "tied.jsonl", [tied, records("nemo_rl")])
    assert PreferenceDataset(path, tok, 512).prompts(1) == [PROMPT]
    plain = [{"question": f"the cat {i}", "chosen": "yes", "rejected": "no"} for i in range(3)]
    path = dump(tmp_path / "plain.jsonl", plain)
    dataset = PreferenceDataset(path, tok, 512, format="trl", columns={"prompt": "question"})
    assert dataset.prompts(2) == ["the cat 0", "the cat 1"]


def test_prefix_breaking_pair_is_dropped_counted_and_logged(tmp_path, caplog):
    tok = build_tokenizer(TRIM_LAST)
    rows = [
        records("trl_conversational", prompt=[msg("user", "hello cat")]),
        records("trl_conversational", prompt=[msg("user", "hello cat  ")]),  # trailing spaces: rewritten
        records("trl_conversational", prompt=[msg("user", "the dog")]),
    ]
    path = dump(tmp_path / "broken.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="preftune"):
        ds = PreferenceDataset(path, tok, 512)
    assert len(ds) == 2 and dict(ds.stats.dropped) == {BROKEN_PREFIX: 1}
    assert ds.drops == [(0, 1, 2, BROKEN_PREFIX)]
    assert f"{path}:2" in caplog.text and BROKEN_PREFIX in caplog.text


def test_template_that_always_breaks_the_prefix_is_an_error(tmp_path):
    tok = build_tokenizer("{{ messages | length }} messages\n" + CHATML)
    path = dump(tmp_path / "count.jsonl", [records("trl_conversational")] * 2)
    with pytest.raises(DataError, match=f"2 {BROKEN_PREFIX}.*nothing left to train on"):
        PreferenceDataset(path, tok, 512)


def test_no_template_error_and_data_chat_template(tmp_path):
    tok = build_tokenizer(CHATML)
    tok.chat_template = None
    path = dump(tmp_path / "c.jsonl", [records("trl_conversational")])
    with pytest.raises(DataError) as info:
        PreferenceDataset(path, tok, 512)
    assert f"{path}:1" in str(info.value) and "data.chat_template" in str(info.value)

    template_file = tmp_path / "chatml.jinja"
    template_file.write_text(CHATML)
    inline = PreferenceDataset(path, tok, 512, chat_template=CHATML)
    from_file = PreferenceDataset(path, tok, 512, chat_template=str(template_file))
    assert list(inline.examples) == list(from_file.examples)
    assert decode(tok, inline[0]["chosen_ids"]) == CHOSEN + "<|im_end|>"
    with pytest.raises(DataError, match="neither a Jinja template .* nor an existing file"):
        PreferenceDataset(path, tok, 512, chat_template=str(tmp_path / "absent.jinja"))


def test_data_chat_template_overrides_the_tokenizers(tmp_path):
    tok = build_tokenizer(CHATML, llama3=True)
    path = dump(tmp_path / "c.jsonl", [records("trl_conversational")])
    ds = PreferenceDataset(path, tok, 512, chat_template=LLAMA3)
    assert decode(tok, ds[0]["chosen_ids"]) == CHOSEN + "<|eot_id|>"
    assert ds[0]["prompt_ids"][0] == tok.bos_token_id


def test_system_folded_into_first_user_turn_when_template_rejects_it(tmp_path):
    tok = build_tokenizer(NO_SYSTEM)
    ds = PreferenceDataset(dump(tmp_path / "s.jsonl", [records("trl_conversational")]), tok, 512)
    prompt = decode(tok, ds[0]["prompt_ids"])
    assert prompt.startswith("<|im_start|>user\nbe brief\n\nhello cat<|im_end|>")
    assert "system" not in prompt


def test_end_token_inside_a_response_is_dropped(tmp_path):
    tok = build_tokenizer(CHATML)
    rows = [records("trl_conversational", chosen="sure<|im_end|> the cat"), records("trl_conversational")]
    ds = PreferenceDataset(dump(tmp_path / "e.jsonl", rows), tok, 512)
    assert len(ds) == 1 and dict(ds.stats.dropped) == {BAD_END: 1}


def test_template_without_end_token_gets_eos(tmp_path):
    tok = build_tokenizer(PLAIN)
    ds = PreferenceDataset(dump(tmp_path / "p.jsonl", [records("trl_conversational")]), tok, 512)
    assert decode(tok, ds[0]["chosen_ids"]) == CHOSEN + "\n<eos>"
    assert ds[0]["chosen_ids"].count(EOS_ID) == 1
    assert decode(tok, ds[0]["prompt_ids"]).endswith("user: and the red bird?\nassistant: ")


def test_text_formats_ignore_the_chat_template(tmp_path):
    tok = build_tokenizer(CHATML)
    row = {"prompt": "hello cat", "chosen": "sure", "rejected": "no"}
    ex = PreferenceDataset(dump(tmp_path / "t.jsonl", [row]), tok, 64)[0]
    assert ex["prompt_ids"] == [tok.bos_token_id, *tok("hello cat", add_special_tokens=False)["input_ids"]]
    assert ex["chosen_ids"][-1] == tok.eos_token_id
