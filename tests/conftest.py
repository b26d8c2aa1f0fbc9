"""Shared fixtures: a tiny locally trained tokenizer, tiny models and small preference files."""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from filelock import FileLock

from preftune.config_checks import load_config
from preftune.data.batch import dpo_custom_collate
from preftune.data.formats import parse_record
from preftune.data.tokenize import PairTokenizer
from preftune.recipe import train
from preftune.tools.tiny import build_tiny_model, save_tiny, train_tokenizer

# Tiny matrices: one thread per test process (and per process a test starts) is many times faster than
# several threads fighting over shared cores, and pytest-xdist runs one test process per core.
os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
torch.set_num_threads(1)

WORDS = (
    "the a cat dog bird fish red blue green small large quick slow runs jumps sits sleeps eats sings "
    "under over near far house tree river hill yes no answer question please list name colour number"
).split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def make_pairs(n: int, seed: int = 0, max_words: int = 12) -> list[dict]:
    """Random NeMo-style pairs with distinct chosen and rejected responses."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        chosen = sentence(rng, rng.randint(1, max_words))
        rejected = sentence(rng, rng.randint(1, max_words))
        while rejected == chosen:
            rejected = sentence(rng, rng.randint(1, max_words))
        pairs.append(
            {
                "prompt": sentence(rng, rng.randint(1, max_words)),
                "chosen_response": chosen,
                "rejected_response": rejected,
            }
        )
    return pairs


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def run(tmp_path: Path, name: str, model_dir: Path, files: dict, *overrides: str) -> tuple[dict, Path]:
    output_dir = tmp_path / name
    cfg = load_config(
        None,
        [
            f"model.path={model_dir}",
            f"data.train={files['train']}",
            f"data.validation={files['validation']}",
            f"output_dir={output_dir}",
            "data.max_seq_length=48",
            "data.micro_batch_size=4",
            "data.global_batch_size=8",
            "optim.lr=5e-3",
            "optim.sched.warmup_steps=2",
            "trainer.val_check_interval=100",
            "trainer.save_interval=100",
            *overrides,
        ],
    )
    return train(cfg), output_dir


def records(output_dir: Path, prefix: str) -> dict[int, dict]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    out = {}
    for line in lines:
        rec = json.loads(line)
        if any(k.startswith(prefix + "/") for k in rec):
            assert rec["step"] not in out, f"step {rec['step']} logged twice"
            out[rec["step"]] = rec
    return out


def pair_batch(tokenizer, n: int = 6, seed: int = 5) -> dict:
    """A padded micro-batch of ``n`` random pairs."""
    pair_tokenizer = PairTokenizer(tokenizer, max_seq_length=64)
    pairs = [pair_tokenizer(parse_record(p, "nemo", "test")) for p in make_pairs(n, seed=seed)]
    return dpo_custom_collate(pairs, tokenizer.eos_token_id)


@pytest.fixture
def forbid_model_copies(monkeypatch):
    """Fail if anything deep-copies a module (a reference model must not be built)."""
    real_deepcopy = copy.deepcopy

    def no_model_copies(obj, *args, **kwargs):
        assert not isinstance(obj, torch.nn.Module), "no copy of the model may be made"
        return real_deepcopy(obj, *args, **kwargs)

    monkeypatch.setattr(copy, "deepcopy", no_model_copies)


@pytest.fixture(scope="session")
def tokenizer():
    rng = random.Random(0)
    return train_tokenizer([sentence(rng, 12) for _ in range(400)], vocab_size=300)


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], object]) -> Path:
    """The directory ``name``, filled by ``build(path)`` once per test run. pytest-xdist gives each worker
    its own temporary directory under one shared by the run: the first worker to ask builds there while the
    others wait on a file lock, then all of them read the same files."""
    root = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        root = root.parent
    path, built = root / name, root / f"{name}.built"
    with FileLock(root / f"{name}.lock"):
        if not built.exists():
            shutil.rmtree(path, ignore_errors=True)  # what a build that failed half-way left
            path.mkdir()
            build(path)
            built.touch()
    return path


def shared_run(tmp_path_factory, name: str, model_dir: Path, files: dict, *overrides: str) -> Path:
    """The output directory of ``run``, trained once per test run and shared by every test that asks for
    the same ``name``. Tests read it; a test that resumes or changes it works on a copy (``copy_run``)."""

    def build(path: Path) -> None:
        run(path, "run", model_dir, files, *overrides)

    return built_once(tmp_path_factory, name, build) / "run"


def copy_run(run_dir: Path, tmp_path: Path, name: str = "run") -> Path:
    """A copy of a shared run at ``tmp_path / name``, for a test that resumes or changes it."""
    return Path(shutil.copytree(run_dir, tmp_path / name))


@pytest.fixture(scope="session")
def straight_run(tmp_path_factory, tiny_model_dir, pair_files) -> Path:
    """Tiny llama, 6 steps, a checkpoint every 2: what interrupted and resumed runs must end up equal to."""
    settings = ("trainer.max_steps=6", "trainer.save_interval=2")
    return shared_run(tmp_path_factory, "straight", tiny_model_dir("llama"), pair_files, *settings)


@pytest.fixture(scope="session")
def half_run(tmp_path_factory, tiny_model_dir, pair_files) -> Path:
    """``straight_run`` stopped after step 4 (checkpoints step_2 and step_4); tests resume or damage copies."""
    settings = ("trainer.max_steps=4", "optim.sched.max_steps=6", "trainer.save_interval=2")
    return shared_run(tmp_path_factory, "half", tiny_model_dir("llama"), pair_files, *settings)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """Factory: a saved tiny model of the given family (built once per test run and arch)."""

    def make(arch: str = "llama") -> Path:
        def build(path: Path) -> None:
            model = build_tiny_model(arch, len(tokenizer), hidden_size=32, num_layers=2, num_heads=4)
            save_tiny(model, tokenizer, path)

        return built_once(tmp_path_factory, f"tiny-{arch}", build)

    return make


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory, tokenizer):
    """Same family and tokenizer as ``tiny_model_dir('llama')``, other weights (an 'SFT' reference)."""

    def build(path: Path) -> None:
        model = build_tiny_model("llama", len(tokenizer), hidden_size=32, num_layers=2, num_heads=4, seed=7)
        save_tiny(model, tokenizer, path)

    return built_once(tmp_path_factory, "other-llama", build)


@pytest.fixture(scope="session")
def pair_files(tmp_path_factory):
    """Small train/validation JSONL files in NeMo format."""

    def build(root: Path) -> None:
        write_jsonl(root / "train.jsonl", make_pairs(48, seed=1))
        write_jsonl(root / "validation.jsonl", make_pairs(16, seed=2))

    root = built_once(tmp_path_factory, "pairs", build)
    return {"train": root / "train.jsonl", "validation": root / "validation.jsonl"}


JUDGE = "def length(prompts, completions, **kwargs):\n    return [float(len(c)) for c in completions]\n"


@pytest.fixture(scope="session")
def length_judge(tmp_path_factory) -> str:
    """``judge.function=...``: a reward function scoring a completion by its length (one file per test run)."""
    root = built_once(tmp_path_factory, "length-judge", lambda path: (path / "judge.py").write_text(JUDGE))
    return f"judge.function={root / 'judge.py'}:length"


@pytest.fixture(scope="session")
def mixtral_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny Mixtral (a router balancing loss over the global batch; built once per test run)."""
    from test_families import saved_family

    return built_once(tmp_path_factory, "tiny-mixtral", lambda path: saved_family("mixtral", tokenizer, path))


@pytest.fixture(scope="session")
def online_files(tmp_path_factory) -> dict[str, Path]:
    """test_online's prompt-only train records, validation pairs and judge file (built once per test run)."""
    from test_online import write_online_files

    root = built_once(tmp_path_factory, "online", write_online_files)
    return {
        "train": root / "prompts.jsonl",
        "validation": root / "validation.jsonl",
        "judge": root / "judge.py",
    }


@pytest.fixture(scope="session")
def two_process_runs(
    tmp_path_factory, tiny_model_dir, other_model_dir, mixtral_dir, pair_files, online_files, length_judge
):
    """test_distributed.py's one torchrun launch of two ranks: the tensor- and context-parallel checks, then
    every two-process training run (test_online's too), each in its own directory (built once per test run;
    read only)."""
    from test_distributed import build_two_process_runs

    def build(root: Path) -> None:
        build_two_process_runs(
            root,
            tiny_model_dir("llama"),
            other_model_dir,
            mixtral_dir,
            pair_files,
            online_files,
            length_judge,
        )

    return built_once(tmp_path_factory, "two-process-runs", build)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow tests first: pytest-xdist then spreads them over its workers from the start and the quick ones
    fill the gaps, instead of one worker finishing a long run alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
