"""Data sources named by id ({hub: ...}), read through datasets.load_dataset offline: a Hub id resolves
through a datasets cache the test lays out (what a first online load leaves behind), a local directory and a
data_files spec through the same call."""

from __future__ import annotations

import os
from pathlib import Path

import datasets
import pyarrow as pa
import pytest

from preftune.cli import main
from preftune.config_checks import load_config
from preftune.data.dataset import PreferenceDataset
from preftune.data.loading import load_datasets
from preftune.data.mixture import WeightedPairs
from preftune.errors import DataError

from conftest import make_pairs, write_jsonl

REPO = "org/prefs"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """Offline, with an empty datasets cache; returns lay_out(repo, split, rows, commit) that writes one
    revision of a dataset into it the way datasets stores a downloaded Hub dataset."""
    cache = tmp_path / "hf-datasets"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # read from the environment at import
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)

    def lay_out(
        repo: str, split: str, rows: list[dict], commit: str, mtime: float | None = None, config="default"
    ) -> Path:
        namespace, name = repo.split("/")
        directory = cache / f"{namespace}___{name}" / config / "0.0.0" / commit
        directory.mkdir(parents=True)
        table = datasets.Dataset.from_list(rows)
        arrow = table.data.table
        with (
            pa.OSFile(str(directory / f"{name}-{split}.arrow"), "wb") as sink,
            pa.ipc.new_stream(sink, arrow.schema) as writer,
        ):
            writer.write_table(arrow)
        splits = datasets.SplitDict()
        splits.add(datasets.SplitInfo(split, num_examples=len(rows), dataset_name=name))
        info = datasets.DatasetInfo(features=table.features, config_name=config, splits=splits)
        info.write_to_directory(str(directory))
        if mtime is not None:  # datasets picks the newest cached revision
            os.utime(directory, (mtime, mtime))
        return directory

    return lay_out


def trl_rows(n: int, seed: int) -> list[dict]:
    return [
        {"prompt": p["prompt"], "chosen": p["chosen_response"], "rejected": p["rejected_response"]}
        for p in make_pairs(n, seed=seed)
    ]


def data_config(tmp_path: Path, train: str, *overrides: str):
    return load_config(
        None, ["model.path=unused", f"output_dir={tmp_path / 'run'}", f"data.train={train}", *overrides]
    ).data


def test_hub_id_loads_like_the_same_rows_from_a_file(tmp_path, tokenizer, hub_cache):
    rows = trl_rows(12, seed=3)
    hub_cache(REPO, "train_prefs", rows, commit="c0ffee1")
    data = data_config(tmp_path, f"{{hub: {REPO}, split: train_prefs}}")  # the command-line spelling
    assert dict(data.train) == {"hub": REPO, "split": "train_prefs"}
    train, val = load_datasets(data, tokenizer, tmp_path / "cache")
    from_file = PreferenceDataset(write_jsonl(tmp_path / "same.jsonl", rows), tokenizer, 1024)
    assert val is None and len(train) == 12 and train.stats.format == "trl"
    assert list(train.examples) == list(from_file.examples)
    assert train.stats.path == f"{REPO}[train_prefs]"
    assert train.where(0, 7) == f"{REPO}[train_prefs]: row 7"

    streamed = PreferenceDataset(
        {"hub": REPO, "split": "train_prefs", "streaming": True}, tokenizer, 1024, tmp_path / "other"
    )
    assert not streamed.from_cache and list(streamed.examples) == list(from_file.examples)


def test_cache_keyed_by_revision(tmp_path, tokenizer, hub_cache):
    spec = {"hub": REPO, "split": "train_prefs"}
    hub_cache(REPO, "train_prefs", trl_rows(8, seed=1), commit="aaaa111", mtime=1_000_000)
    first = PreferenceDataset(spec, tokenizer, 1024, tmp_path / "cache")
    again = PreferenceDataset(spec, tokenizer, 1024, tmp_path / "cache")
    assert not first.from_cache and again.from_cache  # unchanged revision: not tokenized again
    assert again.fingerprint == first.fingerprint and list(again.examples) == list(first.examples)

    hub_cache(REPO, "train_prefs", trl_rows(8, seed=2), commit="bbbb222", mtime=2_000_000)
    new = PreferenceDataset(spec, tokenizer, 1024, tmp_path / "cache")
    assert not new.from_cache and new.fingerprint != first.fingerprint  # a new revision is
    assert list(new.examples) == list(
        PreferenceDataset(write_jsonl(tmp_path / "b.jsonl", trl_rows(8, 2)), tokenizer, 1024).examples
    )
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2


def test_dataset_config_by_name(tmp_path, tokenizer, hub_cache):
    hub_cache(REPO, "train", trl_rows(3, seed=1), commit="c0ffee1", config="small")
    hub_cache(REPO, "train", trl_rows(5, seed=2), commit="c0ffee1", config="large")
    small = PreferenceDataset({"hub": REPO, "name": "small"}, tokenizer, 1024)  # split: train by default
    large = PreferenceDataset({"hub": REPO, "name": "large"}, tokenizer, 1024)
    assert (len(small), len(large)) == (3, 5) and small.stats.path == f"{REPO}/small[train]"
    with pytest.raises(DataError, match=f"dataset {REPO}/medium\\[train\\]: cannot load it: .*offline"):
        PreferenceDataset({"hub": REPO, "name": "medium"}, tokenizer, 1024)


def test_errors_name_dataset_split_and_row(tmp_path, tokenizer, hub_cache):
    rows = trl_rows(4, seed=1)
    rows[2] = {"prompt": "a", "chosen": "b", "rejected": None}
    hub_cache(REPO, "train_prefs", rows, commit="c0ffee1")
    with pytest.raises(DataError, match=rf"^{REPO}\[train_prefs\]: row 3: "):
        PreferenceDataset({"hub": REPO, "split": "train_prefs"}, tokenizer, 1024)
    with pytest.raises(DataError) as info:
        PreferenceDataset({"hub": REPO, "split": "test"}, tokenizer, 1024)
    assert str(info.value) == (
        f"dataset {REPO}[test]: cannot load it: Unknown split \"test\". Should be one of ['train_prefs']."
    )
    with pytest.raises(DataError, match="unknown key 'splt'; a {hub: ...} entry takes hub, split"):
        PreferenceDataset({"hub": REPO, "splt": "train"}, tokenizer, 1024)


def test_missing_dataset_offline_is_one_line_exit_2(tmp_path, tiny_model_dir, hub_cache, capsys):
    config = write_yaml(tmp_path, tiny_model_dir("llama"))
    capsys.readouterr()
    status = main(["inspect", "--config", str(config), "data.train={hub: org/absent, split: train}"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1
    assert err.startswith("preftune: error: dataset org/absent[train]: cannot load it: ")
    assert "offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)" in err and "load it once online" in err


def write_yaml(tmp_path: Path, model_dir: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(f"model:\n  path: {model_dir}\noutput_dir: {tmp_path / 'run'}\ndata:\n  train: x.jsonl\n")
    return path


def test_local_directory_and_data_files_through_load_dataset(tmp_path, tokenizer, hub_cache):
    rows = trl_rows(10, seed=4)
    repo_dir = tmp_path / "local-repo"
    write_jsonl(repo_dir / "data" / "train.jsonl", rows[:6])
    write_jsonl(repo_dir / "data" / "test.jsonl", rows[6:])
    expected = list(PreferenceDataset(write_jsonl(tmp_path / "all.jsonl", rows), tokenizer, 1024).examples)

    local = PreferenceDataset({"hub": str(repo_dir), "split": "test"}, tokenizer, 1024)
    assert list(local.examples) == expected[6:] and local.where(0, 2) == f"{repo_dir}[test]: row 2"
    files = {"hub": "json", "data_files": [str(tmp_path / "all.jsonl")], "split": "train"}
    built = PreferenceDataset(files, tokenizer, 1024, tmp_path / "cache")
    assert list(built.examples) == expected and built.stats.format == "trl"

    write_jsonl(tmp_path / "all.jsonl", rows[:3])  # changed local files: a new fingerprint
    os.utime(tmp_path / "all.jsonl", (3_000_000_000, 3_000_000_000))
    changed = PreferenceDataset(files, tokenizer, 1024, tmp_path / "cache")
    assert not changed.from_cache and list(changed.examples) == expected[:3]


def test_mixture_of_file_and_hub_counts(tmp_path, tokenizer, hub_cache):
    hub_cache(REPO, "train_prefs", trl_rows(10, seed=5), commit="c0ffee1")
    path = write_jsonl(tmp_path / "a.jsonl", make_pairs(6, seed=6))
    data = data_config(
        tmp_path, f"[{{path: {path}, weight: 2.0}}, {{hub: {REPO}, split: train_prefs, weight: 0.5}}]"
    )
    train, _ = load_datasets(data, tokenizer, tmp_path / "cache")
    assert isinstance(train, WeightedPairs) and len(train) == 2 * 6 + 5
    assert [(c.source, c.weight, c.pairs, c.drawn) for c in train.counts] == [
        (str(path), 2.0, 6, 12),
        (f"{REPO}[train_prefs]", 0.5, 10, 5),
    ]
    source_of = train.dataset.origins[:, 0]
    drawn = [int(source_of[train.indices[i]]) for i in range(len(train))]
    assert drawn.count(0) == 12 and drawn.count(1) == 5
    assert "weighted to 17 pairs" in train.stats.summary()
