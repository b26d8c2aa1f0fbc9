"""Formats, sources, column renaming, bad input, the validation split and the cache key."""

from __future__ import annotations

import json
import random
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from preftune.config_checks import load_config
from preftune.data.dataset import TIED, PreferenceDataset
from preftune.data.loading import load_datasets
from preftune.data.sources import read_json_array
from preftune.errors import ConfigError, DataError
from preftune.tools.tiny import train_tokenizer

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = "the a cat dog bird red blue runs sits sleeps hello sure no yes and user assistant".split()


@pytest.fixture(scope="module")
def tok():
    rng = random.Random(1)
    texts = [" ".join(rng.choice(WORDS) for _ in range(10)) for _ in range(300)]
    tok = train_tokenizer(texts, vocab_size=300, extra_special_tokens=("<|im_start|>", "<|im_end|>"))
    tok.chat_template = CHATML
    return tok


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def dump(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def text_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def words(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    return [{"prompt": words(4), "chosen": "yes " + words(3), "rejected": "no " + words(2)} for _ in range(n)]


def enc(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- formats


def test_text_formats_nemo_and_trl(tmp_path, tok):
    rows = text_rows(3)
    nemo = [
        {"prompt": r["prompt"], "chosen_response": r["chosen"], "rejected_response": r["rejected"]}
        for r in rows
    ]
    nemo[1].update(chosen_reward=2.5, rejected_reward=-1)
    a = PreferenceDataset(dump(tmp_path / "nemo.jsonl", nemo), tok, 64)
    b = PreferenceDataset(dump(tmp_path / "trl.jsonl", rows), tok, 64)
    assert (a.stats.format, b.stats.format) == ("nemo", "trl")
    for x, y, row in zip(a.examples, b.examples, rows, strict=True):
        assert x["prompt_ids"] == y["prompt_ids"] == [tok.bos_token_id, *enc(tok, row["prompt"])]
        assert x["chosen_ids"] == y["chosen_ids"] == [*enc(tok, row["chosen"]), tok.eos_token_id]
    assert (a.examples[1]["chosen_reward"], a.examples[1]["rejected_reward"]) == (2.5, -1.0)


def test_tokenized_format_trains_the_ids_as_they_are(tmp_path, tok):
    """Format ``tokenized`` (iterative DPO's pairs; detected by its id columns): no BOS or EOS added, truncated to data.max_seq_length, an
    identical pair dropped; ids that are not a list of ints are a one-line error."""
    rows = [
        {"prompt_ids": [5, 6], "chosen_ids": [7, 8, 9], "rejected_ids": [10], "chosen_reward": 2.0},
        {"prompt_ids": [], "chosen_ids": [7], "rejected_ids": [7]},
        {"prompt_ids": [5, 6, 7, 8], "chosen_ids": [9, 10, 11], "rejected_ids": [12, 13]},
    ]
    data = PreferenceDataset(dump(tmp_path / "ids.jsonl", rows), tok, 6, format="tokenized")
    assert [[ex[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")] for ex in data.examples] == [
        [[5, 6], [7, 8, 9], [10]],
        [[6, 7, 8], [9, 10, 11], [12, 13]],  # the prompt cut from the left first
    ]
    assert (data.examples[0]["chosen_reward"], data.examples[0]["rejected_reward"]) == (2.0, 0.0)
    with_texts = [{**rows[0], "prompt": "a", "chosen": "b", "rejected": "c"}]  # ids win over texts
    detected = PreferenceDataset(dump(tmp_path / "both.jsonl", with_texts), tok, 6)
    assert detected.stats.format == "tokenized" and detected.examples[0]["chosen_ids"] == [7, 8, 9]
    bad = dump(tmp_path / "bad.jsonl", [{"prompt_ids": [5], "chosen_ids": "7 8", "rejected_ids": [9]}])
    with pytest.raises(DataError, match=r"bad.jsonl.*'chosen_ids' must be a list of token ids"):
        PreferenceDataset(bad, tok, 6, format="tokenized")


def nemo_rl(ranks_and_answers: list[tuple[float, str]], question: str = "hello cat") -> dict:
    return {
        "context": [msg("user", question)],
        "completions": [{"rank": r, "completion": [msg("assistant", a)]} for r, a in ranks_and_answers],
    }


def test_nemo_rl_best_vs_worst_all_pairs_and_ties(tmp_path, tok):
    rows = [
        nemo_rl([(2, "no"), (0, "yes the cat"), (1, "the dog")]),
        nemo_rl([(1, "red"), (1, "blue")]),  # no preference: dropped and counted
        nemo_rl(
            [(0, "sure"), (1, "no"), (1, "a bird")]
        ),  # all_pairs: the tie between the two rank-1s is skipped
    ]
    path = dump(tmp_path / "rl.jsonl", rows)

    def texts(ds):
        return [(tok.decode(e["chosen_ids"][:-1]), tok.decode(e["rejected_ids"][:-1])) for e in ds.examples]

    best = PreferenceDataset(path, tok, 128)
    assert best.stats.format == "nemo_rl"
    assert texts(best) == [("yes the cat", "no"), ("sure", "a bird")]
    assert dict(best.stats.dropped) == {TIED: 1}
    every = PreferenceDataset(path, tok, 128, completions="all_pairs")
    assert texts(every) == [
        ("yes the cat", "the dog"),
        ("yes the cat", "no"),
        ("the dog", "no"),
        ("sure", "no"),
        ("sure", "a bird"),
    ]
    assert every.origins[:, 2].tolist() == [1, 1, 1, 3, 3]


def test_columns_renaming_through_the_config(tmp_path, tok):
    rows = text_rows(4)
    renamed = [
        {"question": r["prompt"], "response_j": r["chosen"], "response_k": r["rejected"], "score": 1.5}
        for r in rows
    ]
    path = dump(tmp_path / "se.jsonl", renamed)
    cfg = load_config(
        None,
        [
            "model.path=unused",
            f"data.train={path}",
            "data.columns.prompt=question",
            "data.columns.chosen=response_j",
            "data.columns.rejected=response_k",
            "data.columns.chosen_reward=score",
        ],
    )
    train, val = load_datasets(cfg.data, tok, None)
    plain = PreferenceDataset(dump(tmp_path / "plain.jsonl", rows), tok, 1024)
    assert val is None and train.stats.format == "trl"
    assert [{**e, "chosen_reward": 1.0} for e in train.examples] == list(plain.examples)
    assert train.examples[0]["chosen_reward"] == 1.5
    with pytest.raises(ConfigError, match=r"Did you mean 'data\.columns\.prompt'"):
        load_config(None, ["model.path=x", f"data.train={path}", "data.columns.promt=question"])


# ---------------------------------------------------------------- sources


def test_json_parquet_save_to_disk_and_lists_read_the_same(tmp_path, tok):
    rows = [
        {
            "prompt": [msg("user", f"hello {w}")],
            "chosen": [msg("assistant", "yes")],
            "rejected": [msg("assistant", w)],
        }
        for w in ("cat", "dog", "bird", "red blue")
    ]
    jsonl = dump(tmp_path / "a.jsonl", rows)
    as_json = tmp_path / "a.json"
    as_json.write_text(json.dumps(rows, indent=2))
    parquet = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(saved))

    ref = PreferenceDataset(jsonl, tok, 128)
    assert ref.stats.format == "trl_conversational" and len(ref) == 4
    for source in (as_json, parquet, saved):
        ds = PreferenceDataset(source, tok, 128)
        assert list(ds.examples) == list(ref.examples), source
        assert ds.stats.format == "trl_conversational"
    assert PreferenceDataset(parquet, tok, 128).where(0, 3) == f"{parquet}: row 3"
    # JSON records are located by the line they start on
    assert PreferenceDataset(as_json, tok, 128).origins[:, 2].tolist() == [2, 22, 42, 62]

    both = PreferenceDataset([jsonl, str(parquet), saved], tok, 128)
    assert list(both.examples) == list(ref.examples) * 3
    assert both.origins[:, 0].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert [s.kept for s in both.file_stats] == [4, 4, 4]
    assert both.stats.kept == 12 and both.stats.path == f"{jsonl}, {parquet}, {saved}"


def test_json_array_streams_across_chunk_boundaries(tmp_path):
    records = [{"prompt": "é" * i, "chosen": "a\nb", "rejected": str(i)} for i in range(6)]
    path = tmp_path / "r.json"
    path.write_text("\n[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n]\n")
    for chunk in (1, 3, 7, 1 << 20):
        assert list(read_json_array(path, chunk_size=chunk)) == [(i + 3, r) for i, r in enumerate(records)]


def test_datasetdict_and_plain_directories_are_errors(tmp_path, tok):
    dd = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(text_rows(2))}).save_to_disk(str(dd))
    with pytest.raises(DataError, match=r"DatasetDict .*train"):
        PreferenceDataset(dd, tok, 64)
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match=r"no state\.json"):
        PreferenceDataset(tmp_path / "plain", tok, 64)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type"):
        PreferenceDataset(tmp_path / "x.csv", tok, 64)


# ---------------------------------------------------------------- bad input


def conv(prompt: list, chosen: str = "yes", rejected: str = "no") -> dict:
    return {"prompt": prompt, "chosen": [msg("assistant", chosen)], "rejected": [msg("assistant", rejected)]}


GOOD = json.dumps(conv([msg("user", "hello")])).encode()


def _write(path: Path, content: bytes | list | None) -> Path:
    if path.suffix == ".parquet":
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            table = (
                pa.Table.from_pylist(content) if content else pa.table({"prompt": pa.array([], pa.string())})
            )
            pq.write_table(table, path)
    else:
        path.write_bytes(content)
    return path


BAD = {
    "invalid-json": ("jsonl", GOOD + b'\n{"prompt": [', ":2", "invalid JSON"),
    "invalid-json-array": ("json", b"[\n" + GOOD + b",\n" + GOOD[:-3] + b"\n]", ":4", "invalid JSON"),
    "json-not-array": ("json", GOOD, ":1", "must hold one JSON array"),
    "misspelled-column": (
        "jsonl",
        json.dumps({"prompt": "q", "chosen": "a", "rejectd": "b"}).encode(),
        ":1",
        "columns (chosen, prompt, rejectd); the nearest, trl (prompt, chosen, rejected), lacks 'rejected'; "
        "did you mean 'rejectd'? (set data.columns.rejected=rejectd)",
    ),
    "missing-column-later": (
        "jsonl",
        GOOD + b"\n" + json.dumps({"prompt": [msg("user", "q")], "chosen": []}).encode(),
        ":2",
        "missing column 'rejected' (trl_conversational format, like the file's first record; found: chosen, prompt)",
    ),
    "message-without-role": (
        "jsonl",
        json.dumps(conv([{"content": "hello"}])).encode(),
        ":1",
        "message 1 of 'prompt' has no 'role' (keys: content)",
    ),
    "message-without-content": (
        "jsonl",
        json.dumps(conv([msg("user", "hi"), {"role": "assistant"}, msg("user", "and?")])).encode(),
        ":1",
        "message 2 of 'prompt' has no 'content'",
    ),
    "assistant-first": (
        "jsonl",
        json.dumps(conv([msg("assistant", "hi")])).encode(),
        ":1",
        "roles in an impossible order in 'chosen' (assistant > assistant): assistant message 1 comes before any user",
    ),
    "system-in-the-middle": (
        "jsonl",
        json.dumps(conv([msg("user", "hi"), msg("system", "be kind")])).encode(),
        ":1",
        "message 2 is a system message; one is allowed, first",
    ),
    "implicit-ends-with-user": (
        "jsonl",
        json.dumps(
            {
                "chosen": [msg("user", "a"), msg("assistant", "b"), msg("user", "c")],
                "rejected": [msg("user", "a")],
            }
        ).encode(),
        ":1",
        "must end with the assistant's response, not a user message",
    ),
    "differ-before-final-turn": (
        "jsonl",
        json.dumps(
            {
                "chosen": [msg("user", "a"), msg("assistant", "b")],
                "rejected": [msg("user", "x"), msg("assistant", "b")],
            }
        ).encode(),
        ":1",
        "chosen and rejected differ at message 1, before their final assistant turn",
    ),
    "non-utf8-jsonl": ("jsonl", GOOD + b'\n{"prompt": "q\xff"}', ":2", "not valid UTF-8"),
    "non-utf8-json": ("json", b'[\n{"prompt":\n "q\xff"}]', ":3", "not valid UTF-8"),
    "empty-jsonl": ("jsonl", b"", "", "the file has no records"),
    "empty-json": ("json", b" [ ] ", "", "the file has no records"),
    "empty-parquet": ("parquet", [], "", "the file has no records"),
    "unreadable-parquet": ("parquet", b"PAR1 this is not parquet", "", "cannot read as Parquet"),
    "bad-parquet-row": (
        "parquet",
        [conv([msg("user", "a")]), conv([msg("user", "b")], chosen="")],
        ": row 2",
        "the final assistant message of 'chosen' is empty",
    ),
    "bad-rank": (
        "jsonl",
        json.dumps(nemo_rl([(0, "a"), ("high", "b")])).encode(),
        ":1",
        "completion 2: 'rank' must be a finite number",
    ),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_input_is_a_one_line_error_naming_file_and_place(tmp_path, tok, case):
    suffix, content, place, expected = BAD[case]
    path = _write(tmp_path / f"bad.{suffix}", content)
    with pytest.raises(DataError) as info:
        PreferenceDataset(path, tok, 64)
    message = str(info.value)
    assert "\n" not in message
    assert f"{path}{place}" in message and expected in message, message


def test_missing_renamed_column_names_the_nearest(tmp_path, tok):
    path = dump(tmp_path / "r.jsonl", [{"questions": "q", "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError) as info:
        PreferenceDataset(path, tok, 64, columns={"prompt": "question"})
    assert f"{path}:1: data.columns.prompt names column 'question', which is not there" in str(info.value)
    assert "did you mean 'questions'?" in str(info.value)


def test_bad_option_values(tmp_path, tok):
    path = dump(tmp_path / "t.jsonl", text_rows(2))
    with pytest.raises(ConfigError, match=r"data\.format='tlr'"):
        PreferenceDataset(path, tok, 64, format="tlr")
    with pytest.raises(ConfigError, match=r"data\.completions="):
        PreferenceDataset(path, tok, 64, completions="best")
    with pytest.raises(DataError, match=f"{path}:1: missing column 'chosen_response'"):
        PreferenceDataset(path, tok, 64, format="nemo")


# ---------------------------------------------------------------- validation split


def test_validation_fraction_is_a_deterministic_split_of_records(tmp_path, tok):
    rows = text_rows(40, seed=3)
    rows[5] = {**rows[5], "rejected": rows[5]["chosen"]}  # dropped: still a record of the split
    path = dump(tmp_path / "t.jsonl", rows)
    overrides = ["model.path=unused", f"data.train={path}", "data.validation_fraction=0.25"]

    def split(*extra):
        train, val = load_datasets(load_config(None, [*overrides, *extra]).data, tok, tmp_path / "cache")
        return train, val

    train, val = split()
    train_again, val_again = split()
    assert val_again.from_cache and list(val.examples) == list(val_again.examples)
    assert train.origins.tolist() == train_again.origins.tolist()
    records_val = {int(r) for r in val.origins[:, 1]} | {d[1] for d in val.drops}
    records_train = {int(r) for r in train.origins[:, 1]} | {d[1] for d in train.drops}
    assert len(records_val) == 10 and records_val.isdisjoint(records_train)
    assert records_val | records_train == set(range(40))
    assert len(train) + len(val) == 39 and train.stats.kept + val.stats.kept == 39
    assert "(validation split)" in val.stats.summary() and train.fingerprint != val.fingerprint
    _, other = split("data.seed=99")
    assert {int(r) for r in other.origins[:, 1]} != {int(r) for r in val.origins[:, 1]}
    with pytest.raises(ConfigError, match="not both"):
        split(f"data.validation={path}")


def test_all_pairs_of_a_record_land_on_one_side(tmp_path, tok):
    rows = [nemo_rl([(0, "yes"), (1, "the dog"), (2, "no")], question=f"hello {i}") for i in range(10)]
    path = dump(tmp_path / "rl.jsonl", rows)
    whole = PreferenceDataset(path, tok, 128, completions="all_pairs")
    train, val = whole.split(0.3, seed=0)
    assert len(val) == 9 and len(train) == 21
    assert set(val.origins[:, 1].tolist()).isdisjoint(train.origins[:, 1].tolist())


# ---------------------------------------------------------------- cache


def test_cache_key_covers_template_and_settings(tmp_path, tok):
    path = dump(tmp_path / "c.jsonl", [conv([msg("user", "hello")])] * 2)
    cache = tmp_path / "cache"
    first = PreferenceDataset(path, tok, 128, cache)
    assert not first.from_cache and PreferenceDataset(path, tok, 128, cache).from_cache
    other_template = CHATML.replace("{{ m.content }}<|im_end|>", "{{ m.content }} <|im_end|>")
    changed = PreferenceDataset(path, tok, 128, cache, chat_template=other_template)
    assert not changed.from_cache and changed.fingerprint != first.fingerprint
    assert list(changed.examples) != list(first.examples)
    fingerprints = {
        first.fingerprint,
        changed.fingerprint,
        PreferenceDataset(path, tok, 128, format="trl_conversational").fingerprint,
        PreferenceDataset(path, tok, 128, completions="all_pairs").fingerprint,
        PreferenceDataset(path, tok, 128, columns={"prompt": "prompt"}).fingerprint,
    }
    assert len(fingerprints) == 5
    assert PreferenceDataset(path, tok, 128, cache, chat_template=other_template).from_cache
