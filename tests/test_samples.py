"""Sample generations at validation: written per validation step, greedy (the same prompt gives the same
text as ``generate`` called directly), and the training trajectory is the same with samples on or off."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import records, run

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_samples_leave_the_trajectory_unchanged(lora, tmp_path, tiny_model_dir, pair_files):
    model_dir = tiny_model_dir("llama")
    common = ("trainer.max_steps=4", "trainer.val_check_interval=2", *(("model.lora.r=4",) if lora else ()))
    _, off = run(tmp_path, "off", model_dir, pair_files, *common)
    _, on = run(
        tmp_path,
        "on",
        model_dir,
        pair_files,
        *common,
        "trainer.samples.num_prompts=3",
        "trainer.samples.max_new_tokens=5",
    )
    a, b = records(off, "train"), records(on, "train")
    for step in a:
        for key in ("train/loss", "train/grad_norm", "train/acc"):
            assert a[step][key] == b[step][key], (step, key)
    rows = [json.loads(line) for line in (on / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0] * 3 + [2] * 3 + [4] * 3
    assert all(0 <= r["num_tokens"] <= 5 for r in rows)
    validation = [json.loads(line) for line in pair_files["validation"].read_text().splitlines()]
    assert [r["chosen"].strip() for r in rows[:3]] == [v["chosen_response"] for v in validation[:3]]
    if not lora:  # step 0: the base model's own greedy answer
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        base = AutoModelForCausalLM.from_pretrained(model_dir)
        ids = tokenizer(validation[0]["prompt"], return_tensors="pt").input_ids
        out = base.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        new = out[0, ids.shape[1] :].tolist()
        new = new[: new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new
        assert rows[0]["num_tokens"] == len(new)
        assert rows[0]["generation"] == tokenizer.decode(new, skip_special_tokens=True)


def greedy(model_dir, prompt: str, max_new_tokens: int) -> tuple[str, int]:
    """The base model's own greedy answer (cut at EOS) and its token count, from transformers directly."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = base.generate(
        ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id
    )
    new = out[0, ids.shape[1] :].tolist()
    new = new[: new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new
    # a byte-level generation cut inside a multi-byte character ends in U+FFFD: samples drop that broken tail
    return tokenizer.decode(new, skip_special_tokens=True).rstrip("\ufffd"), len(new)


def test_greedy_generation_of_a_packed_run_equals_sdpa(tiny_model_dir):
    """A packed run's policy runs ``preftune_varlen``, which cannot decode with a KV cache (its causal rule
    has no cached keys): greedy generation switches to SDPA, so its tokens equal an SDPA model's."""
    from preftune.modeling.attention import varlen_attention_forward  # noqa: F401 (registers preftune_varlen)
    from preftune.training.samples import greedy_generate

    model_dir = tiny_model_dir("llama")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tokenizer("the cat sits")["input_ids"], tokenizer("a red bird sings near")["input_ids"]]
    sdpa = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
    varlen = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="preftune_varlen")
    expected = greedy_generate(sdpa, prompts, 12, tokenizer.eos_token_id)
    assert greedy_generate(varlen, prompts, 12, tokenizer.eos_token_id) == expected
    assert varlen.config._attn_implementation == "preftune_varlen"  # restored after generating
