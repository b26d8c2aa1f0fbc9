"""Preference data: file formats, tokenization, bad lines, truncation, cache, sampler and collate."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch

from preftune.config_checks import load_config
from preftune.data.batch import dpo_custom_collate
from preftune.data.dataset import PreferenceDataset, TokenizedPairs
from preftune.data.loading import load_datasets
from preftune.data.sampler import GlobalBatchSampler
from preftune.errors import DataError
from preftune.tools.tiny import BOS_ID, EOS_ID, train_tokenizer

VOCAB = [
    "alpha",
    "river",
    "stone",
    "cloud",
    "green",
    "paper",
    "window",
    "quiet",
    "yellow",
    "music",
    "table",
    "garden",
    "simple",
    "orange",
    "morning",
    "evening",
    "bright",
    "heavy",
    "little",
    "window",
    "answer",
    "question",
    "please",
    "thanks",
    "sure",
    "maybe",
    "never",
    "always",
    "today",
    "tomorrow",
    "the",
    "a",
    "an",
    "of",
    "to",
    "and",
    "is",
    "was",
    "yes",
    "no",
    "what",
    "why",
    "how",
]


def corpus_sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(VOCAB) for _ in range(n))


@pytest.fixture(scope="session")
def tok():
    rng = random.Random(123)
    texts = [corpus_sentence(rng, rng.randint(3, 15)) + rng.choice([".", "?", "!"]) for _ in range(300)]
    return train_tokenizer(texts, vocab_size=300)


@pytest.fixture(scope="session")
def other_tok():
    rng = random.Random(999)
    texts = [corpus_sentence(rng, rng.randint(2, 6)) for _ in range(200)]
    return train_tokenizer(texts, vocab_size=280)


def enc(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def dump(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def nemo(prompt: str, chosen: str, rejected: str, **extra) -> dict:
    return {"prompt": prompt, "chosen_response": chosen, "rejected_response": rejected, **extra}


def trl(prompt: str, chosen: str, rejected: str, **extra) -> dict:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **extra}


PAIRS = [
    ("what is the river?", "the river is green.", "no."),
    ("please answer the question", "sure, the answer is yes", "never"),
    ("why was the morning quiet", "maybe the music was simple", "always the garden"),
    ("an alpha of stone", "a stone", "a cloud of paper"),
    ("how is the window", " bright and yellow", " heavy"),
]


# ---------------------------------------------------------------- formats


def test_nemo_and_trl_formats_load_with_rewards(tmp_path, tok):
    nemo_rows = [
        nemo(p, c, r, chosen_reward=3.5, rejected_reward=-1) if i % 2 else nemo(p, c, r)
        for i, (p, c, r) in enumerate(PAIRS)
    ]
    trl_rows = [trl(p, c, r) for p, c, r in PAIRS]
    nemo_set = PreferenceDataset(dump(tmp_path / "nemo.jsonl", nemo_rows), tok, 256)
    trl_set = PreferenceDataset(dump(tmp_path / "trl.jsonl", trl_rows), tok, 256)

    assert nemo_set.stats.format == "nemo"
    assert trl_set.stats.format == "trl"
    assert len(nemo_set) == len(trl_set) == len(PAIRS)
    assert nemo_set.stats.kept == len(PAIRS)
    for i in range(len(PAIRS)):
        a, b = nemo_set[i], trl_set[i]
        for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
            assert a[key] == b[key]
        assert a["index"] == i
        if i % 2:
            assert (a["chosen_reward"], a["rejected_reward"]) == (3.5, -1.0)
        else:
            assert (a["chosen_reward"], a["rejected_reward"]) == (1.0, 0.0)
        assert (b["chosen_reward"], b["rejected_reward"]) == (1.0, 0.0)


def test_trl_rewards_carried(tmp_path, tok):
    rows = [trl("q one", "yes", "no", chosen_reward=0.25, rejected_reward=0.75)]
    ds = PreferenceDataset(dump(tmp_path / "t.jsonl", rows), tok, 64)
    assert ds[0]["chosen_reward"] == 0.25
    assert ds[0]["rejected_reward"] == 0.75


def test_missing_file_raises(tmp_path, tok):
    with pytest.raises(DataError, match="not found"):
        PreferenceDataset(tmp_path / "absent.jsonl", tok, 64)


def test_a_missing_file_names_its_key_and_path(tmp_path, tok):
    """The one line names the config key (a list entry by its index) and the path, not the path alone."""
    present = dump(tmp_path / "t.jsonl", [nemo("q", "yes", "no")] * 4)
    absent = tmp_path / "absent.jsonl"
    lines = {
        f"data.train={absent}": f"data.train: data file not found: {absent}",
        f"data.train=[{present}, {{path: {absent}, weight: 2}}]": f"data.train[1]: data file not found: {absent}",
        f"data.validation={absent}": f"data.validation: data file not found: {absent}",
    }
    for override, line in lines.items():
        data = load_config(None, ["model.path=m", f"data.train={present}", override]).data
        with pytest.raises(DataError) as info:
            load_datasets(data, tok, None)
        assert str(info.value) == line


# ---------------------------------------------------------------- tokenization


def check_pair(tok, ex, prompt, chosen, rejected):
    bos, eos = tok.bos_token_id, tok.eos_token_id
    # prompt tokenized on its own, BOS once in front: an exact prefix of every sequence
    raw_prompt = enc(tok, prompt)
    expected_prompt = raw_prompt if raw_prompt[:1] == [bos] else [bos, *raw_prompt]
    assert ex["prompt_ids"] == expected_prompt
    for ids, text in ((ex["chosen_ids"], chosen), (ex["rejected_ids"], rejected)):
        seq = ex["prompt_ids"] + ids
        assert seq[: len(ex["prompt_ids"])] == expected_prompt
        assert seq[0] == bos and seq.count(bos) == 1
        assert ids[-1] == eos and ids.count(eos) == 1
        assert eos not in ex["prompt_ids"]
        body = text.removesuffix("<eos>")
        assert ids[:-1] == enc(tok, body)
        decoded = tok.decode(seq, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        assert decoded == prompt.removeprefix("<bos>") + body
        assert tok.decode(seq, clean_up_tokenization_spaces=False) == (
            "<bos>" + prompt.removeprefix("<bos>") + body + "<eos>"
        )


def test_prompt_is_exact_prefix_and_round_trips(tmp_path, tok):
    ds = PreferenceDataset(dump(tmp_path / "p.jsonl", [nemo(*p) for p in PAIRS]), tok, 512)
    assert tok.bos_token_id == BOS_ID and tok.eos_token_id == EOS_ID
    for ex, (p, c, r) in zip(ds.examples, PAIRS, strict=True):
        check_pair(tok, ex, p, c, r)


def test_prefix_survives_merges_across_the_boundary(tmp_path, tok):
    # "the garden" tokenized jointly may merge across the prompt/response cut; separately it may not
    prompt, chosen, rejected = "the gar", "den is quiet", "den was never"
    ds = PreferenceDataset(dump(tmp_path / "m.jsonl", [nemo(prompt, chosen, rejected)]), tok, 512)
    ex = ds[0]
    assert ex["prompt_ids"] == [BOS_ID, *enc(tok, prompt)]
    assert ex["chosen_ids"] == [*enc(tok, chosen), EOS_ID]
    assert ex["rejected_ids"] == [*enc(tok, rejected), EOS_ID]


def test_no_double_bos_or_eos_when_text_has_them(tmp_path, tok):
    rows = [
        nemo("<bos>what is the river?", "the river is green.<eos>", "no."),
        trl("<bos>please", "sure", "never<eos>"),
    ]
    path_a = dump(tmp_path / "a.jsonl", rows[:1])
    path_b = dump(tmp_path / "b.jsonl", rows[1:])
    ex_a = PreferenceDataset(path_a, tok, 512)[0]
    ex_b = PreferenceDataset(path_b, tok, 512)[0]
    check_pair(tok, ex_a, *rows[0].values())
    check_pair(tok, ex_b, *rows[1].values())
    assert ex_a["prompt_ids"] == [BOS_ID, *enc(tok, "what is the river?")]
    assert ex_a["chosen_ids"] == [*enc(tok, "the river is green."), EOS_ID]
    assert ex_b["rejected_ids"] == [*enc(tok, "never"), EOS_ID]


def test_empty_prompt_is_just_bos(tmp_path, tok):
    ds = PreferenceDataset(dump(tmp_path / "e.jsonl", [nemo("", "yes", "no")]), tok, 64)
    assert ds[0]["prompt_ids"] == [BOS_ID]


# ---------------------------------------------------------------- bad lines

GOOD = json.dumps(nemo("q", "yes", "no")).encode()


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(b'{"prompt": "q", "chosen_response": ', id="invalid-json"),
        pytest.param(b'["q", "yes", "no"]', id="json-array"),
        pytest.param(b'"just a string"', id="json-string"),
        pytest.param(json.dumps({"prompt": "q", "chosen_response": "yes"}).encode(), id="missing-key"),
        pytest.param(json.dumps(trl("q", "yes", "no")).encode(), id="other-format-keys"),
        pytest.param(json.dumps(nemo("q", "", "no")).encode(), id="empty-chosen"),
        pytest.param(json.dumps(nemo("q", "yes", " \t\n ")).encode(), id="whitespace-rejected"),
        pytest.param(json.dumps(nemo(5, "yes", "no")).encode(), id="int-prompt"),
        pytest.param(json.dumps(nemo(None, "yes", "no")).encode(), id="null-prompt"),
        pytest.param(json.dumps(nemo("q", ["yes"], "no")).encode(), id="list-response"),
        pytest.param(json.dumps(nemo("q", "yes", "no", chosen_reward="high")).encode(), id="str-reward"),
        pytest.param(json.dumps(nemo("q", "yes", "no", rejected_reward=None)).encode(), id="null-reward"),
        pytest.param(json.dumps(nemo("q", "yes", "no", chosen_reward=True)).encode(), id="bool-reward"),
        pytest.param(
            b'{"prompt": "q", "chosen_response": "yes", "rejected_response": "no", "chosen_reward": NaN}',
            id="nan-reward",
        ),
        pytest.param(
            b'{"prompt": "q\xff\xfe", "chosen_response": "yes", "rejected_response": "no"}', id="non-utf8"
        ),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, tok, bad):
    # line 1 good, line 2 blank, line 3 good, line 4 whitespace, line 5 bad, line 6 good
    content = b"\n".join([GOOD, b"", GOOD, b"   ", bad, GOOD]) + b"\n"
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        PreferenceDataset(path, tok, 64)
    assert_names_line(str(info.value), path, 5)


def assert_names_line(msg: str, path: Path, line: int) -> None:
    assert str(path) in msg
    rest = msg.replace(str(path), "<PATH>")
    assert "<PATH>:" + str(line) in rest or re.search(rf"\bline {line}\b", rest), msg


def test_bad_first_line(tmp_path, tok):
    path = tmp_path / "first.jsonl"
    path.write_bytes(b'{"prompt": "q", "answer": "x"}\n' + GOOD + b"\n")
    with pytest.raises(DataError) as info:
        PreferenceDataset(path, tok, 64)
    assert_names_line(str(info.value), path, 1)


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"], ids=["empty", "blank-lines-only"])
def test_empty_file(tmp_path, tok, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        PreferenceDataset(path, tok, 64)
    assert str(path) in str(info.value)


def test_blank_lines_are_skipped(tmp_path, tok):
    rows = [json.dumps(nemo(*p)) for p in PAIRS]
    path = tmp_path / "blank.jsonl"
    path.write_text("\n" + "\n\n".join(rows) + "\n\n   \n\r\n")
    ds = PreferenceDataset(path, tok, 512)
    assert len(ds) == len(PAIRS)
    for ex, (p, c, r) in zip(ds.examples, PAIRS, strict=True):
        check_pair(tok, ex, p, c, r)


# ---------------------------------------------------------------- truncation


def test_long_prompt_cut_from_the_left(tmp_path, tok):
    words = [VOCAB[i % len(VOCAB)] for i in range(60)]
    prompt = " ".join(words)
    chosen, rejected = "yes the answer", "no"
    full_prompt = [BOS_ID, *enc(tok, prompt)]
    full_chosen = [*enc(tok, chosen), EOS_ID]
    full_rejected = [*enc(tok, rejected), EOS_ID]
    max_len = 24
    assert len(full_prompt) + len(full_chosen) > max_len + 10  # the prompt really must be cut

    ds = PreferenceDataset(dump(tmp_path / "long.jsonl", [nemo(prompt, chosen, rejected)]), tok, max_len)
    ex = ds[0]
    keep = max_len - len(full_chosen)  # the longer response decides how much prompt fits
    assert ex["prompt_ids"] == [BOS_ID, *full_prompt[len(full_prompt) - keep + 1 :]]
    assert ex["chosen_ids"] == full_chosen
    assert ex["rejected_ids"] == full_rejected
    assert len(ex["prompt_ids"]) + len(ex["chosen_ids"]) == max_len
    assert len(ex["prompt_ids"]) + len(ex["rejected_ids"]) <= max_len
    # the tail of the prompt text survives
    tail = tok.decode(ex["prompt_ids"][1:], clean_up_tokenization_spaces=False)
    assert prompt.endswith(tail) and len(tail) > 0


def test_responses_cut_from_the_right_after_prompt(tmp_path, tok):
    prompt = "please answer the question about the river and the stone"
    chosen = " ".join(VOCAB[:30])
    rejected = " ".join(reversed(VOCAB[:30]))
    full_prompt = [BOS_ID, *enc(tok, prompt)]
    full_chosen = [*enc(tok, chosen), EOS_ID]
    full_rejected = [*enc(tok, rejected), EOS_ID]
    max_len = 12
    ds = PreferenceDataset(dump(tmp_path / "resp.jsonl", [nemo(prompt, chosen, rejected)]), tok, max_len)
    ex = ds[0]
    # the prompt shrinks to BOS + its last token, then the responses keep their heads
    assert ex["prompt_ids"] == [BOS_ID, full_prompt[-1]]
    assert ex["chosen_ids"] == full_chosen[: max_len - 2]
    assert ex["rejected_ids"] == full_rejected[: max_len - 2]
    assert len(ex["prompt_ids"]) + len(ex["chosen_ids"]) == max_len


@pytest.mark.parametrize("max_len", [3, 5, 8, 13, 21, 40])
def test_truncation_properties_over_many_pairs(tmp_path, tok, max_len):
    rng = random.Random(max_len)
    rows = []
    for _ in range(40):
        prompt = corpus_sentence(rng, rng.randint(0, 25))
        # different first words: the responses can never become identical by truncation
        rows.append(
            nemo(
                prompt,
                "yes " + corpus_sentence(rng, rng.randint(0, 20)),
                "no " + corpus_sentence(rng, rng.randint(0, 20)),
            )
        )
    ds = PreferenceDataset(dump(tmp_path / f"prop{max_len}.jsonl", rows), tok, max_len)
    assert len(ds) == len(rows)
    for ex, row in zip(ds.examples, rows, strict=True):
        full_prompt = [BOS_ID, *enc(tok, row["prompt"])]
        full_c = [*enc(tok, row["chosen_response"]), EOS_ID]
        full_r = [*enc(tok, row["rejected_response"]), EOS_ID]
        p, c, r = ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"]
        assert len(p) + len(c) <= max_len and len(p) + len(r) <= max_len
        assert p[0] == BOS_ID and p.count(BOS_ID) == 1
        assert p[1:] == full_prompt[len(full_prompt) - len(p) + 1 :]  # a tail of the prompt
        assert c == full_c[: len(c)] and r == full_r[: len(r)]  # heads of the responses
        assert c and r
        fits = len(full_prompt) + max(len(full_c), len(full_r)) <= max_len
        if fits:
            assert (p, c, r) == (full_prompt, full_c, full_r)
        responses_cut = len(c) < len(full_c) or len(r) < len(full_r)
        if responses_cut:
            # responses are only cut once the prompt is down to BOS + one token
            assert len(p) == min(2, len(full_prompt))
            assert len(p) + max(len(c), len(r)) == max_len
        elif not fits:
            assert len(p) + max(len(c), len(r)) == max_len


def test_identical_after_truncation_dropped_and_counted(tmp_path, tok):
    common = "the river is green and the stone is heavy"
    prompt = "what is the question"
    rows = [
        nemo(prompt, common + " yes", common + " no"),  # identical once cut to the common head
        nemo(prompt, "yes", "no"),
    ]
    # the prompt is cut first, down to BOS + one token; the responses then get the common head only
    max_len = min(2, len([BOS_ID, *enc(tok, prompt)])) + len(enc(tok, common))
    assert enc(tok, common + " yes")[: len(enc(tok, common))] == enc(tok, common)
    assert enc(tok, common + " no")[: len(enc(tok, common))] == enc(tok, common)
    ds = PreferenceDataset(dump(tmp_path / "ident.jsonl", rows), tok, max_len)
    assert len(ds) == 1
    assert ds.stats.kept == 1
    assert sum(ds.stats.dropped.values()) == 1
    assert ds[0]["chosen_ids"] == [*enc(tok, "yes"), EOS_ID]
    # with one more token of room the same pair is kept
    roomy = PreferenceDataset(dump(tmp_path / "ident2.jsonl", rows), tok, max_len + 1)
    assert len(roomy) == 2 and sum(roomy.stats.dropped.values()) == 0


def test_identical_in_file_dropped_and_counted(tmp_path, tok):
    rows = [nemo("q", "same answer", "same answer"), nemo("q", "yes", "no"), trl("x", "a", "b")]
    rows[2] = nemo("r", "maybe", "maybe")
    ds = PreferenceDataset(dump(tmp_path / "same.jsonl", rows), tok, 64)
    assert len(ds) == 1
    assert ds.stats.kept == 1
    assert sum(ds.stats.dropped.values()) == 2
    assert ds[0]["chosen_ids"] == [*enc(tok, "yes"), EOS_ID]
    assert "2" in ds.stats.summary()


def test_all_pairs_dropped_raises(tmp_path, tok):
    rows = [nemo("q", "same", "same"), nemo("r", "also same", "also same")]
    path = dump(tmp_path / "alldrop.jsonl", rows)
    with pytest.raises(DataError) as info:
        PreferenceDataset(path, tok, 64)
    assert str(path) in str(info.value)


# ---------------------------------------------------------------- cache


def test_cache_hit_and_misses(tmp_path, tok, other_tok):
    rows = [nemo(*p) for p in PAIRS] + [nemo("q", "dup", "dup")]
    path = dump(tmp_path / "c.jsonl", rows)
    cache = tmp_path / "cache"

    first = PreferenceDataset(path, tok, 64, cache)
    assert first.from_cache is False
    second = PreferenceDataset(path, tok, 64, cache)
    assert second.from_cache is True
    assert list(second.examples) == list(first.examples)
    assert (second.stats.format, second.stats.kept) == (first.stats.format, first.stats.kept)
    assert dict(second.stats.dropped) == dict(first.stats.dropped)
    assert sum(second.stats.dropped.values()) == 1
    assert [second[i] for i in range(len(second))] == [first[i] for i in range(len(first))]

    # other settings miss the cache and give the right (different) result
    short = PreferenceDataset(path, tok, 6, cache)
    assert short.from_cache is False
    assert all(len(e["prompt_ids"]) + len(e["chosen_ids"]) <= 6 for e in short.examples)

    other = PreferenceDataset(path, other_tok, 64, cache)
    assert other.from_cache is False
    assert other[0]["chosen_ids"] == [*enc(other_tok, PAIRS[0][1]), EOS_ID]
    assert list(other.examples) != list(first.examples)

    # a changed file misses, and its new content is read
    dump(path, [*rows, nemo("new prompt", "new yes", "new no")])
    changed = PreferenceDataset(path, tok, 64, cache)
    assert changed.from_cache is False
    assert len(changed) == len(first) + 1
    assert changed[len(changed) - 1]["prompt_ids"] == [BOS_ID, *enc(tok, "new prompt")]

    # each earlier setting still hits its own entry
    assert PreferenceDataset(path, tok, 64, cache).from_cache is True
    assert PreferenceDataset(path, other_tok, 64, cache).from_cache is False  # file changed since


def test_same_content_edit_back_and_forth(tmp_path, tok):
    path = dump(tmp_path / "d.jsonl", [nemo("q", "yes", "no")])
    cache = tmp_path / "cache"
    PreferenceDataset(path, tok, 64, cache)
    dump(path, [nemo("q", "yes", "never")])  # same size class, different bytes
    changed = PreferenceDataset(path, tok, 64, cache)
    assert changed.from_cache is False
    assert changed[0]["rejected_ids"] == [*enc(tok, "never"), EOS_ID]


def test_no_cache_dir_never_from_cache(tmp_path, tok):
    path = dump(tmp_path / "n.jsonl", [nemo("q", "yes", "no")])
    assert PreferenceDataset(path, tok, 64).from_cache is False
    assert PreferenceDataset(path, tok, 64).from_cache is False


# ---------------------------------------------------------------- GlobalBatchSampler


def flat(batches):
    return [i for b in batches for i in b]


def test_sampler_every_index_once_without_drop_last():
    s = GlobalBatchSampler(23, 5, seed=3, drop_last=False)
    batches = list(s)
    assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
    assert sorted(flat(batches)) == list(range(23))
    assert len(s) == 5 == s.batches_per_epoch


def test_sampler_drop_last_drops_the_tail():
    keep_all = list(GlobalBatchSampler(23, 5, seed=3, drop_last=False))
    s = GlobalBatchSampler(23, 5, seed=3, drop_last=True)
    batches = list(s)
    assert len(s) == 4 == len(batches)
    assert all(len(b) == 5 for b in batches)
    assert len(set(flat(batches))) == 20
    assert batches == keep_all[:4]


def test_sampler_exact_multiple_same_either_way():
    a = list(GlobalBatchSampler(20, 5, seed=1, drop_last=True))
    b = list(GlobalBatchSampler(20, 5, seed=1, drop_last=False))
    assert a == b and len(a) == 4 and sorted(flat(a)) == list(range(20))


def test_sampler_deterministic_per_seed_and_epoch():
    def order(seed, epoch):
        s = GlobalBatchSampler(50, 10, seed=seed)
        s.set_epoch(epoch)
        return list(s)

    assert order(7, 0) == order(7, 0)
    assert order(7, 3) == order(7, 3)
    assert order(7, 0) != order(7, 1)
    assert order(7, 1) != order(7, 2)
    assert order(7, 0) != order(8, 5)
    assert sorted(flat(order(7, 1))) == list(range(50))
    # iterating twice gives the same epoch
    s = GlobalBatchSampler(50, 10, seed=7)
    assert list(s) == list(s)


def test_sampler_shuffles_and_no_shuffle_is_in_order():
    assert flat(GlobalBatchSampler(50, 10, seed=0)) != list(range(50))
    assert list(GlobalBatchSampler(7, 3, shuffle=False, drop_last=False)) == [[0, 1, 2], [3, 4, 5], [6]]


@pytest.mark.parametrize("drop_last", [True, False])
def test_sampler_resume_from_start_batch(drop_last):
    s = GlobalBatchSampler(37, 6, seed=11, drop_last=drop_last)
    s.set_epoch(2)
    full = list(s)
    for k in range(len(full) + 1):
        s.set_epoch(2, start_batch=k)
        assert list(s) == full[k:]
        assert len(s) == len(full) - k


@pytest.mark.parametrize("num_samples, drop_last", [(36, True), (40, False), (38, False), (41, True)])
def test_sampler_ranks_split_the_same_global_batches(num_samples, drop_last):
    single = GlobalBatchSampler(num_samples, 6, seed=5, drop_last=drop_last)
    ranks = [
        GlobalBatchSampler(num_samples, 6, seed=5, drop_last=drop_last, rank=r, world_size=2) for r in (0, 1)
    ]
    for epoch in (0, 1):
        for s in (single, *ranks):
            s.set_epoch(epoch, start_batch=1)
        one = list(single)
        per_rank = [list(s) for s in ranks]
        assert len(per_rank[0]) == len(per_rank[1]) == len(one)
        for b, batch in enumerate(one):
            assert per_rank[0][b] + per_rank[1][b] == batch
            if len(batch) == 6:
                assert len(per_rank[0][b]) == len(per_rank[1][b]) == 3


def test_sampler_rejects_batch_not_divisible_by_ranks():
    with pytest.raises(ValueError):
        GlobalBatchSampler(10, 5, world_size=2)


# ---------------------------------------------------------------- collate

PAD = EOS_ID
EX1 = {
    "prompt_ids": [0, 10, 11],
    "chosen_ids": [20, 21, 1],
    "rejected_ids": [30, 1],
    "chosen_reward": 2.0,
    "rejected_reward": -0.5,
    "index": 7,
}
EX2 = {
    "prompt_ids": [0, 12],
    "chosen_ids": [22, 1],
    "rejected_ids": [31, 32, 33, 34, 1],
    "chosen_reward": 1.0,
    "rejected_reward": 0.0,
    "index": 3,
}


def test_collate_exact_tensors():
    out = dpo_custom_collate([EX1, EX2], eos_id=PAD)
    # longest: prompt2 + rejected2 = 2 + 5 = 7
    assert out["chosen"].tolist() == [[0, 10, 11, 20, 21, 1, PAD], [0, 12, 22, 1, PAD, PAD, PAD]]
    assert out["rejected"].tolist() == [[0, 10, 11, 30, 1, PAD, PAD], [0, 12, 31, 32, 33, 34, 1]]
    assert out["chosen_length"].tolist() == [6, 4]
    assert out["rejected_length"].tolist() == [5, 7]
    m = -100
    assert out["chosen_labels"].tolist() == [[m, m, m, 20, 21, 1, m], [m, m, 22, 1, m, m, m]]
    assert out["rejected_labels"].tolist() == [[m, m, m, 30, 1, m, m], [m, m, 31, 32, 33, 34, 1]]
    assert out["attention_mask"].tolist() == [
        [1, 1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1, 1],
    ]
    assert out["position_ids"].tolist() == [list(range(7))] * 4
    assert out["chosen_rewards"].tolist() == [2.0, 1.0]
    assert out["rejected_rewards"].tolist() == [-0.5, 0.0]
    assert out["chosen_rewards"].dtype == torch.float32
    assert out["chosen"].dtype == torch.long and out["chosen_labels"].dtype == torch.long
    assert out["indices"].tolist() == [7, 3]


@pytest.mark.parametrize("multiple, length", [(None, 7), (1, 7), (4, 8), (7, 7), (8, 8), (16, 16)])
def test_collate_pad_to_multiple_of(multiple, length):
    out = dpo_custom_collate([EX1, EX2], eos_id=PAD, pad_to_multiple_of=multiple)
    for key in ("chosen", "rejected", "chosen_labels", "rejected_labels"):
        assert tuple(out[key].shape) == (2, length)
    assert tuple(out["attention_mask"].shape) == (4, length)
    assert tuple(out["position_ids"].shape) == (4, length)
    assert out["attention_mask"].sum(1).tolist() == [6, 4, 5, 7]
    assert out["chosen"][1, 4:].tolist() == [PAD] * (length - 4)
    assert out["rejected_labels"][0, 5:].tolist() == [-100] * (length - 5)


def test_collate_on_a_real_dataset(tmp_path, tok):
    ds = PreferenceDataset(dump(tmp_path / "col.jsonl", [nemo(*p) for p in PAIRS]), tok, 512)
    items = [ds[i] for i in (4, 0, 2)]
    out = dpo_custom_collate(items, eos_id=tok.eos_token_id, pad_to_multiple_of=8)
    B, T = out["chosen"].shape
    assert B == 3 and T % 8 == 0
    longest = max(len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"])) for e in items)
    assert longest <= T < longest + 8
    for side, row_offset in (("chosen", 0), ("rejected", B)):
        for i, ex in enumerate(items):
            seq = ex["prompt_ids"] + ex[f"{side}_ids"]
            n, p = len(seq), len(ex["prompt_ids"])
            row = out[side][i].tolist()
            assert row == seq + [tok.eos_token_id] * (T - n)
            labels = out[f"{side}_labels"][i].tolist()
            assert labels == [-100] * p + seq[p:] + [-100] * (T - n)
            mask = out["attention_mask"][row_offset + i].tolist()
            assert mask == [1] * n + [0] * (T - n)
            assert out["position_ids"][row_offset + i].tolist() == list(range(T))
            assert out[f"{side}_length"][i].item() == n
    assert out["indices"].tolist() == [4, 0, 2]


def test_tokenized_pairs_store():
    rng = random.Random(0)
    examples = [
        {name: [rng.randrange(50_000) for _ in range(rng.randint(0 if name == "prompt_ids" else 1, 9))]
         for name in ("prompt_ids", "chosen_ids", "rejected_ids")} | {"chosen_reward": rng.random(),
                                                                       "rejected_reward": -rng.random()}
        for _ in range(40)
    ]  # fmt: skip
    store = TokenizedPairs.from_examples(iter(examples))  # filled from a stream, as tokenizing does
    assert len(store) == 40 and list(store) == examples and store[-1] == examples[-1]
    assert store.columns["chosen_ids"].dtype == torch.int32
    picked = torch.tensor([7, 0, 39, 7])
    assert list(store.select(picked)) == [examples[i] for i in picked.tolist()]
    assert list(store.select(torch.tensor([], dtype=torch.long))) == []
    with pytest.raises(IndexError):
        store[40]
    assert len(TokenizedPairs.from_examples([])) == 0
