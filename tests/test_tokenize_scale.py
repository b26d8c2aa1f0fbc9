"""Tokenization at scale: the batched pipeline equals pair-by-pair tokenization, keeps errors in place, fills
the store without a copy, reports from offsets; two ranks survive a tokenization longer than their timeout."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from preftune.data import pipeline
from preftune.data.dataset import PreferenceDataset
from preftune.data.formats import parse_pairs
from preftune.data.pipeline import PairStoreBuilder
from preftune.data.tokenize import PairTokenizer
from preftune.errors import DataError
from preftune.tools.inspect_data import file_reports

from conftest import make_pairs, write_jsonl

PLAIN = (
    "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def mixed_files(tmp_path: Path, n: int) -> tuple[Path, Path]:
    """Text pairs (some identical, some truncated to nothing) and conversational pairs, in two files."""
    text = make_pairs(n, seed=3, max_words=30)
    for i in range(0, n, 7):
        text[i]["rejected_response"] = text[i]["chosen_response"]
    chat = [
        {
            "prompt": [msg("user", p["prompt"])],
            "chosen": [msg("assistant", p["chosen_response"])],
            "rejected": [msg("assistant", p["rejected_response"])],
        }
        for p in make_pairs(n // 2, seed=4, max_words=20)
    ]
    return write_jsonl(tmp_path / "text.jsonl", text), write_jsonl(tmp_path / "chat.jsonl", chat)


def one_by_one(path: Path, pair_tokenizer: PairTokenizer, fmt: str) -> list[dict | str]:
    """The slow path: each record parsed and each text encoded on its own."""
    out = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        (pair,) = parse_pairs(json.loads(line), fmt, f"{path}:{n}")
        texts = pair_tokenizer.texts(pair)
        if isinstance(texts, str):
            out.append(texts)
            continue
        ids = [pair_tokenizer.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        out.append(pair_tokenizer.finish(pair, *ids))
    return out


@pytest.mark.parametrize("chunk_chars", [1, 300, 1 << 20], ids=["pair-chunks", "small-chunks", "one-chunk"])
def test_batched_pipeline_equals_pair_by_pair(tmp_path, tokenizer, monkeypatch, chunk_chars):
    monkeypatch.setattr(pipeline, "CHUNK_CHARS", chunk_chars)
    text, chat = mixed_files(tmp_path, 60)
    ds = PreferenceDataset([text, chat], tokenizer, 24, chat_template=PLAIN)
    pair_tokenizer = PairTokenizer(tokenizer, 24, PLAIN)
    expected = one_by_one(text, pair_tokenizer, "nemo") + one_by_one(
        chat, pair_tokenizer, "trl_conversational"
    )
    kept = [e for e in expected if isinstance(e, dict)]
    assert len(ds) == len(kept) and 0 < len(ds) < len(expected)  # some pairs really are dropped
    for k, example in enumerate(kept):
        assert ds[k] == {**example, "index": k}
    lines = [(f, n) for f, count in ((0, 60), (1, 30)) for n in range(1, count + 1)]
    reasons = [(*where, e) for where, e in zip(lines, expected, strict=True) if isinstance(e, str)]
    assert [(d[0], d[2], d[3]) for d in ds.drops] == reasons
    assert [tuple(o) for o in ds.origins[:, [0, 2]].tolist()] == [
        where for where, e in zip(lines, expected, strict=True) if isinstance(e, dict)
    ]
    assert ds.records == [60, 30] and ds.formats == ["nemo", "trl_conversational"]


def test_error_after_many_chunks_names_its_line(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(pipeline, "CHUNK_CHARS", 100)
    path = write_jsonl(tmp_path / "late.jsonl", make_pairs(200, seed=5))
    with path.open("a") as f:
        f.write('{"prompt": "q", "chosen_response": 3, "rejected_response": "no"}\n')
    with pytest.raises(DataError, match=rf"^{path}:201: 'chosen_response' must be a string"):
        PreferenceDataset(path, tokenizer, 64)


def test_store_columns_share_the_builders_memory():
    builder = PairStoreBuilder()
    builder.add({"prompt_ids": [5, 6], "chosen_ids": [7], "rejected_ids": [8, 9, 10]} | REWARDS)
    builder.add({"prompt_ids": [], "chosen_ids": [1], "rejected_ids": [2]} | REWARDS)
    columns = builder.columns()
    assert columns["prompt_ids"].data_ptr() == builder.tokens["prompt_ids"].buffer_info()[0]
    assert columns["rejected_ids"].tolist() == [8, 9, 10, 2] and columns["rejected_ids"].dtype == torch.int32
    assert columns["rejected_ids_offsets"].tolist() == [0, 3, 4]
    assert columns["chosen_reward"].tolist() == [1.0, 1.0]
    with pytest.raises(BufferError):  # the tensors hold the buffers: they can no longer move
        builder.tokens["prompt_ids"].append(1)


REWARDS = {"chosen_reward": 1.0, "rejected_reward": 0.0}


def test_parallelism_on_while_tokenizing_then_off(tmp_path, tokenizer, monkeypatch, pair_files):
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    seen = []
    encode = PairTokenizer.encode_texts
    monkeypatch.setattr(
        PairTokenizer,
        "encode_texts",
        lambda self, texts: seen.append(os.environ["TOKENIZERS_PARALLELISM"]) or encode(self, texts),
    )
    PreferenceDataset(pair_files["train"], tokenizer, 64)
    assert set(seen) == {"true"} and os.environ["TOKENIZERS_PARALLELISM"] == "false"
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # the user's choice is kept
    seen.clear()
    PreferenceDataset(pair_files["train"], tokenizer, 64)
    assert set(seen) == {"false"}


def test_progress_bar_shows_pairs_per_second_on_a_terminal(tmp_path, tokenizer, monkeypatch, pair_files):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    ds = PreferenceDataset(pair_files["train"], tokenizer, 64)
    assert "tokenizing train.jsonl" in terminal.getvalue() and " pairs/s]" in terminal.getvalue()
    assert ds.load_summary().endswith(" pairs/s)") and f"{len(ds)} pairs kept" in ds.load_summary()


def test_report_from_offsets_equals_the_pairs(tmp_path, tokenizer):
    records = make_pairs(80, seed=8, max_words=25)
    for i in range(0, 80, 5):
        records[i]["prompt"] = records[0]["prompt"]  # 16 pairs share one prompt
    records[3]["prompt"] = records[2]["prompt"]  # and two more share another
    ds = PreferenceDataset(write_jsonl(tmp_path / "r.jsonl", records), tokenizer, 40)
    (report,) = file_reports(ds, tokenizer)
    examples = [ds[k] for k in range(len(ds))]
    for side in ("prompt", "chosen", "rejected"):
        ordered = sorted(len(ex[f"{side}_ids"]) for ex in examples)
        n = len(ordered)
        expected = {"p50": ordered[-(-n // 2) - 1], "p90": ordered[-(-9 * n // 10) - 1]}
        expected |= {"p99": ordered[-(-99 * n // 100) - 1], "max": ordered[-1]}
        assert report["tokens"][side] == expected, side
    shared = [c for c in Counter(tuple(ex["prompt_ids"]) for ex in examples).values() if c > 1]
    assert report["duplicate_prompts"] == {"prompts": len(shared), "pairs": sum(shared)}
    assert len(shared) >= 2 and sum(shared) >= 18
    assert np.array_equal(ds.origins[:, 2].numpy(), np.arange(1, len(ds) + 1))


# ---------------------------------------------------------------- many ranks

BURN = "{% for _ in range(1000) %}{% for _ in range(1500) %}{% endfor %}{% endfor %}"  # ~0.3 s a render
TIMEOUT_S = 5


@pytest.mark.slow
def test_two_ranks_outlast_the_timeout_while_rank_0_tokenizes(tmp_path, tiny_model_dir, tokenizer):
    """Rank 0 renders a slow chat template for longer than the process-group timeout; rank 1 waits."""
    from test_distributed import torchrun

    conv = [
        {
            "prompt": [msg("user", p["prompt"])],
            "chosen": [msg("assistant", p["chosen_response"])],
            "rejected": [msg("assistant", p["rejected_response"])],
        }
        for p in make_pairs(36, seed=9)  # ~0.1 s a pair: twice the timeout on a fast machine
    ]
    data = write_jsonl(tmp_path / "conv.jsonl", conv)
    template = tmp_path / "slow.jinja"
    template.write_text(BURN + PLAIN)
    out = tmp_path / "run"
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    cmd = torchrun(
        2,
        "train",
        "--config",
        str(config),
        f"model.path={tiny_model_dir('llama')}",
        f"data.train={data}",
        f"data.chat_template={template}",
        f"output_dir={out}",
        "data.max_seq_length=48",
        "data.micro_batch_size=1",
        "data.global_batch_size=2",
        "trainer.max_steps=1",
        "trainer.val_check_interval=100",
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PREFTUNE_DIST_TIMEOUT_S": str(TIMEOUT_S)}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    (line,) = [x for x in done.stdout.splitlines() if "pairs kept" in x]
    seconds = float(line.split("tokenized in ")[1].split(" s")[0])
    assert seconds > TIMEOUT_S, f"tokenization took {seconds} s, not longer than the timeout: nothing shown"
    (cache,) = (out / "cache" / "tokenized").iterdir()  # one file: rank 1 loaded rank 0's cache
    stored = torch.load(cache, weights_only=True)["content"]["examples"]  # a checked file
    same_tokens = PreferenceDataset(data, tokenizer, 48, chat_template=PLAIN)  # the burn writes nothing
    for name, column in same_tokens.examples.columns.items():
        assert torch.equal(stored[name], column), name
