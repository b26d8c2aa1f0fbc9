"""Weighted mixtures of data.train sources: exact counts per source, a deterministic subsample for fractional
weights, inspect's before/after counts, and a resumed run equal to a straight one."""

from __future__ import annotations

import json

import pytest
import torch

from preftune.cli import main
from preftune.config_checks import load_config
from preftune.data.loading import load_datasets
from preftune.data.mixture import WeightedPairs, mixture_indices
from preftune.errors import ConfigError, DataError

from conftest import make_pairs, records, run, write_jsonl

SIZES = (4, 10, 3, 5, 7)


def interleaved_sources() -> torch.Tensor:
    """Source of each pair, the sources' pairs interleaved (as after a validation split)."""
    source_of = torch.cat([torch.full((n,), s) for s, n in enumerate(SIZES)])
    return source_of[torch.randperm(len(source_of), generator=torch.Generator().manual_seed(0))]


def test_exact_counts_per_source():
    source_of = interleaved_sources()
    weights = [2.0, 0.5, 0.0, 1.5, 1.3]
    indices = mixture_indices(source_of, weights, seed=7)
    drawn = torch.bincount(source_of[indices], minlength=5).tolist()
    assert drawn == [
        8,
        5,
        0,
        5 + 3,
        7 + 2,
    ]  # 0.5 of 10 = 5; 0.5 of 5 = 2.5 -> 3 (half up); 0.3 of 7 = 2.1 -> 2
    times = torch.bincount(indices, minlength=len(source_of))
    members = [(source_of == s).nonzero().squeeze(1) for s in range(5)]
    assert times[members[0]].tolist() == [2] * 4  # every pair twice
    assert sorted(times[members[1]].tolist()) == [0] * 5 + [1] * 5  # five different pairs once
    assert times[members[2]].tolist() == [0] * 3 and sorted(times[members[3]].tolist()) == [1] * 2 + [2] * 3
    assert sorted(times[members[4]].tolist()) == [1] * 5 + [2] * 2


def test_subsample_is_deterministic_and_per_source():
    source_of = interleaved_sources()
    a = mixture_indices(source_of, [1.0, 0.5, 1.0, 1.0, 1.0], seed=7)
    assert torch.equal(a, mixture_indices(source_of, [1.0, 0.5, 1.0, 1.0, 1.0], seed=7))  # every rank, run
    b = mixture_indices(source_of, [3.0, 0.5, 0.0, 2.0, 1.0], seed=7)  # other sources' weights changed

    def half(idx):
        return sorted(i for i in idx.tolist() if source_of[i] == 1)

    assert half(a) == half(b) and len(half(a)) == 5
    seeds = {tuple(half(mixture_indices(source_of, [1, 0.5, 1, 1, 1], seed=s))) for s in range(6)}
    assert len(seeds) > 1  # the seed decides which half


def mixture_files(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", make_pairs(6, seed=11))
    b = write_jsonl(tmp_path / "b.jsonl", make_pairs(10, seed=12))
    return a, b


def test_weights_through_the_config(tmp_path, tokenizer):
    a, b = mixture_files(tmp_path)
    spec = f"[{{path: {a}, weight: 2}}, {{path: {b}, weight: 0.5}}, {a}]"
    data = load_config(None, ["model.path=x", f"data.train={spec}"]).data
    train, _ = load_datasets(data, tokenizer, None)
    assert isinstance(train, WeightedPairs) and len(train) == 12 + 5 + 6
    assert [(c.weight, c.pairs, c.drawn) for c in train.counts] == [(2.0, 6, 12), (0.5, 10, 5), (1.0, 6, 6)]
    by_tokens = [json.dumps(train[i]["chosen_ids"]) for i in range(len(train))]
    for k in range(6):  # a's pairs: twice from the first entry, once from the third
        example = train.dataset.examples[k]
        assert by_tokens.count(json.dumps(example["chosen_ids"])) == 3
    assert [train[i]["index"] for i in range(len(train))] == list(range(len(train)))

    unweighted = load_config(None, ["model.path=x", f"data.train=[{{path: {a}}}, {b}]"]).data
    assert not isinstance(load_datasets(unweighted, tokenizer, None)[0], WeightedPairs)
    with pytest.raises(ConfigError, match="data.validation: weights apply to data.train only"):
        load_datasets(
            load_config(
                None, ["model.path=x", f"data.train={a}", f"data.validation=[{{path: {b}, weight: 2}}]"]
            ).data,
            tokenizer,
            None,
        )
    with pytest.raises(DataError, match="weight must be a number >= 0"):
        load_datasets(
            load_config(None, ["model.path=x", f"data.train=[{{path: {a}, weight: -1}}]"]).data,
            tokenizer,
            None,
        )
    with pytest.raises(DataError, match="the data.train weights leave no pairs"):
        load_datasets(
            load_config(None, ["model.path=x", f"data.train=[{{path: {a}, weight: 0}}]"]).data,
            tokenizer,
            None,
        )


def test_inspect_shows_pairs_before_and_after_weighting(tmp_path, tiny_model_dir, tokenizer, capsys):
    a, b = mixture_files(tmp_path)
    config = tmp_path / "config.yaml"
    config.write_text(
        f"model: {{path: {tiny_model_dir('llama')}}}\noutput_dir: {tmp_path / 'run'}\n"
        f"data:\n  train:\n    - {{path: {a}, weight: 2.5}}\n    - {{path: {b}, weight: 0.3}}\n"
    )
    capsys.readouterr()
    assert main(["inspect", "--config", str(config), "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "== train: 18 pairs (data.train)" in out  # 2.5 x 6 + 0.3 x 10
    assert "  weight 2.5: 6 pairs -> 15 drawn per epoch" in out
    assert "  weight 0.3: 10 pairs -> 3 drawn per epoch" in out
    files = json.loads((tmp_path / "r.json").read_text())["datasets"][0]["files"]
    assert [(f["kept"], f["weight"], f["weighted"]) for f in files] == [(6, 2.5, 15), (10, 0.3, 3)]


@pytest.mark.slow
def test_resume_with_a_mixture_equals_straight_run(tmp_path, tiny_model_dir, pair_files, capsys):
    extra = write_jsonl(tmp_path / "extra.jsonl", make_pairs(8, seed=9))
    files = {  # 48 x 0.25 + 8 x 2.5 = 32 pairs: 4 steps of 8
        "train": f"[{{path: {pair_files['train']}, weight: 0.25}}, {{path: {extra}, weight: 2.5}}]",
        "validation": pair_files["validation"],
    }
    model_dir = tiny_model_dir("llama")
    _, straight = run(tmp_path, "straight", model_dir, files, "trainer.max_steps=4")
    assert "weighted to 32 pairs" in capsys.readouterr().out
    common = ("optim.sched.max_steps=4",)
    run(tmp_path, "resumed", model_dir, files, "trainer.max_steps=2", *common)
    capsys.readouterr()
    _, resumed = run(tmp_path, "resumed", model_dir, files, "trainer.max_steps=4", *common)
    assert "resuming from" in capsys.readouterr().out
    a, b = records(straight, "train"), records(resumed, "train")
    assert sorted(a) == sorted(b) == list(range(1, 5))
    for step in a:
        for key in ("train/loss", "train/acc", "train/grad_norm", "train/consumed_samples"):
            assert a[step][key] == b[step][key], (step, key)
