"""``preftune inspect``: the text report and the same report as JSON."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from preftune.cli import main
from preftune.data.tokenize import IDENTICAL
from preftune.tools.tiny import train_tokenizer

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = "the a cat dog bird red blue runs sits hello sure no yes user assistant".split()


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    rng = random.Random(2)
    texts = [" ".join(rng.choice(WORDS) for _ in range(10)) for _ in range(300)]
    tok = train_tokenizer(texts, vocab_size=300, extra_special_tokens=("<|im_start|>", "<|im_end|>"))
    tok.chat_template = CHATML
    out = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(out)
    return out


@pytest.fixture
def files(tmp_path):
    conv = [
        {
            "prompt": [msg("user", "hello cat")],
            "chosen": [msg("assistant", "yes the cat")],
            "rejected": [msg("assistant", "no")],
        },
        {
            "prompt": [msg("user", "the dog")],
            "chosen": [msg("assistant", "same")],
            "rejected": [msg("assistant", "same")],
        },
        {
            "prompt": [msg("user", "hello cat")],
            "chosen": [msg("assistant", "sure")],
            "rejected": [msg("assistant", "a bird")],
        },
    ]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in conv))
    val = tmp_path / "val.parquet"
    rows = [{"prompt": "red bird", "chosen_response": "sits", "rejected_response": "runs"}] * 2
    pq.write_table(pa.Table.from_pylist(rows), val)
    return train, val


def config(tmp_path, model_dir, **data) -> str:
    lines = [f"model:\n  path: {model_dir}", f"output_dir: {tmp_path / 'run'}", "data:"]
    lines += [f"  {k}: {json.dumps(v)}" for k, v in data.items()]
    path = tmp_path / "config.yaml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_inspect_text_and_json(tmp_path, model_dir, files, capsys):
    train, val = files
    cfg = config(tmp_path, model_dir, train=str(train), validation=str(val))
    report_path = tmp_path / "report.json"
    assert main(["inspect", "--config", cfg, "--json", str(report_path), "data.max_seq_length=64"]) == 0
    text = capsys.readouterr().out
    report = json.loads(report_path.read_text())

    assert report["chat_template"] == "the tokenizer's" and report["max_seq_length"] == 64
    train_set, val_set = report["datasets"]
    assert (train_set["name"], train_set["pairs"], val_set["pairs"]) == ("train", 2, 2)
    (t,) = train_set["files"]
    assert (t["path"], t["format"], t["records"], t["kept"]) == (str(train), "trl_conversational", 3, 2)
    assert t["dropped"] == {IDENTICAL: 1} and t["first_dropped_at"] == {IDENTICAL: f"{train}:2"}
    assert t["duplicate_prompts"] == {"prompts": 1, "pairs": 2}
    assert set(t["tokens"]) == {"prompt", "chosen", "rejected"} and set(t["tokens"]["chosen"]) == {
        "p50",
        "p90",
        "p99",
        "max",
    }
    first = t["first_pair"]
    assert first["at"] == f"{train}:1"
    assert (
        first["chosen"]
        == "<|im_start|>user\nhello cat<|im_end|>\n<|im_start|>assistant\n⟦yes the cat<|im_end|>⟧"
    )
    assert first["rejected"].endswith("assistant\n⟦no<|im_end|>⟧")
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert first["chosen_tokens"] == len(tok("yes the cat<|im_end|>", add_special_tokens=False)["input_ids"])
    (v,) = val_set["files"]
    assert (v["path"], v["format"], v["kept"], v["dropped"]) == (str(val), "nemo", 2, {})
    assert v["first_pair"]["chosen"] == "<bos>red bird⟦sits<eos>⟧"

    # the text shows the same facts
    assert f"{train}\n  format trl_conversational: 3 records, 2 pairs kept, 1 dropped" in text
    assert f"1 {IDENTICAL} (first at {train}:2)" in text
    assert "duplicate prompts: 1 prompts shared by 2 pairs" in text
    assert "⟦yes the cat<|im_end|>⟧" in text and "<bos>red bird⟦sits<eos>⟧" in text
    header = next(line for line in text.splitlines() if line.lstrip().startswith("tokens"))
    assert header.split() == ["tokens", "p50", "p90", "p99", "max"]
    chosen_row = next(line for line in text.splitlines() if line.lstrip().startswith("chosen "))
    assert [int(x) for x in chosen_row.split()[1:]] == list(t["tokens"]["chosen"].values())


def test_inspect_validation_fraction_and_file_lists(tmp_path, model_dir, files, capsys):
    train, val = files
    cfg = config(tmp_path, model_dir, train=[str(train), str(val)], validation_fraction=0.4)
    report_path = tmp_path / "r.json"
    assert main(["inspect", "--config", cfg, "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    train_set, val_set = report["datasets"]
    assert val_set["source"] == "data.validation_fraction=0.4 of data.train, seed 1234"
    assert train_set["pairs"] + val_set["pairs"] == 4
    assert [f["path"] for f in train_set["files"]] == [str(train), str(val)]
    records = [f["records"] for f in train_set["files"]]
    val_records = [f["records"] for f in val_set["files"]]
    assert [a + b for a, b in zip(records, val_records, strict=True)] == [3, 2] and sum(val_records) == 2
    assert "== validation:" in capsys.readouterr().out


def test_inspect_bad_data_exits_2(tmp_path, model_dir, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a", "rejectd": "b"}\n')
    assert main(["inspect", "--config", config(tmp_path, model_dir, train=str(bad))]) == 2
    assert f"{bad}:1: cannot tell the format" in capsys.readouterr().err
