"""reference.mode=precompute: cached reference log-probs equal the online ones, in training and validation;
stale caches are rebuilt and current ones loaded; the reference model is freed."""

from __future__ import annotations

import itertools
import random
import shutil
from functools import partial
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from preftune.config_checks import load_config
from preftune.data.batch import dpo_custom_collate, padded_micro_batches
from preftune.data.dataset import PreferenceDataset
from preftune.data.sampler import GlobalBatchSampler
from preftune.modeling.logprobs import SequenceLogprobs
from preftune.modeling.model import DPOModel
from preftune.modeling.reference import CachedReference, FrozenReference, NoReference
from preftune.modeling.reference_cache import (
    ReferenceCache,
    model_fingerprint,
    precompute_reference,
    with_cached_reference,
)
from preftune.tools.tiny import build_tiny_model, save_tiny, train_tokenizer
from preftune.training.checkpoint import Checkpointer
from preftune.training.metrics import MetricsLogger
from preftune.training.optim import build_optimizer, build_scheduler
from preftune.training.timer import RunTimer
from preftune.training.trainer import DPOTrainer

from conftest import make_pairs, sentence, write_jsonl

MAX_LEN = 48


def config(model_dir: Path, files: dict, output_dir: Path, *overrides: str):
    return load_config(
        None,
        [
            f"model.path={model_dir}",
            f"data.train={files['train']}",
            f"data.validation={files['validation']}",
            f"output_dir={output_dir}",
            f"data.max_seq_length={MAX_LEN}",
            "data.micro_batch_size=4",
            "data.global_batch_size=8",
            "optim.lr=5e-3",
            "trainer.max_steps=3",
            "trainer.val_check_interval=100",
            "trainer.save_interval=100",
            *overrides,
        ],
    )


def collate_for(tokenizer) -> partial:
    return partial(padded_micro_batches, micro_batch_size=4, eos_id=tokenizer.eos_token_id)


def build(model_dir: Path, files: dict, tmp_path: Path, *overrides: str) -> DPOModel:
    return DPOModel.from_config(config(model_dir, files, tmp_path, *overrides))


def build_cache(model: DPOModel, dataset: PreferenceDataset, tokenizer, cache_dir: Path, model_dir: Path):
    return ReferenceCache.load_or_build(
        model,
        dataset,
        collate_for(tokenizer),
        cache_dir,
        model_fingerprint=model_fingerprint(model_dir, "float32"),
        batch_pairs=8,
    )


def perturb(module: torch.nn.Module, scale: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)


def test_cached_logps_equal_online_reference(tmp_path, tiny_model_dir, pair_files, tokenizer):
    model_dir = tiny_model_dir("qwen2")
    model = build(model_dir, pair_files, tmp_path, "dpo.preference_average_log_probs=true")
    perturb(model.policy)  # a trained policy: the cache must come from the reference, never the policy
    dataset = PreferenceDataset(pair_files["validation"], tokenizer, MAX_LEN)
    cache = build_cache(model, dataset, tokenizer, tmp_path / "ref", model_dir)
    assert not cache.from_cache and cache.path.is_file()
    assert cache.logps.dtype == torch.float32 and cache.logps.shape == (len(dataset), 2)
    for start in range(0, len(dataset), 4):  # the training collate's batches, in dataset order
        pairs = [cache[i] for i in range(start, min(start + 4, len(dataset)))]
        batch = dpo_custom_collate(pairs, tokenizer.eos_token_id)
        with torch.no_grad():
            online = model.reference_logprobs(batch)
            policy, _ = model.sequence_logprobs(model.policy, batch)
        n = len(pairs)
        cached = torch.tensor([p["ref_logps"] for p in pairs])
        # sums of ~50 fp32 log-probs of ~-5 each: batch shapes move the last bits (rtol 1e-6 is ~16 ulp)
        torch.testing.assert_close(cached[:, 0], online[:n], atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(cached[:, 1], online[n:], atol=1e-5, rtol=1e-6)
        assert (cached.t().flatten() - policy).abs().max() > 1e-2
        assert pairs[0]["chosen_ids"] == dataset[start]["chosen_ids"] and pairs[0]["index"] == start
        # the loss averages the summed cached log-probs over its own token counts
        with_cache = with_cached_reference(lambda ps: [dpo_custom_collate(ps, tokenizer.eos_token_id)])(pairs)
        _, expected = model.get_loss_and_metrics(batch, forward_only=True)
        _, got = model.get_loss_and_metrics(with_cache[0], forward_only=True)
        assert expected.keys() == got.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=0, msg=key)


def run(out: Path, model_dir: Path, files: dict, tokenizer, precompute: bool) -> dict:
    """3 training steps and a validation with the online or the precomputed reference, built like the recipe."""
    cfg = config(model_dir, files, out)
    model = DPOModel.from_config(cfg)
    datasets = [PreferenceDataset(files[s], tokenizer, MAX_LEN) for s in ("train", "validation")]
    collate = collate_for(tokenizer)
    caches = []
    if precompute:
        caches = precompute_reference(
            model,
            datasets,
            collate,
            out / "cache" / "reference",
            model_fingerprint=model_fingerprint(model_dir, cfg.model.dtype),
            batch_pairs=cfg.data.global_batch_size,
        )
        datasets, collate = caches, with_cached_reference(collate)
    train_loader, val_loader = (
        DataLoader(
            d, batch_sampler=GlobalBatchSampler(len(d), 8, seed=5, shuffle=t, drop_last=t), collate_fn=list
        )
        for d, t in zip(datasets, (True, False), strict=True)
    )
    optimizer = build_optimizer(model.policy, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, 3)
    trainer = DPOTrainer(
        cfg,
        model,
        optimizer,
        scheduler,
        train_loader,
        val_loader,
        None,
        collate,
        MetricsLogger(out, enabled=False),
        Checkpointer(out),
        RunTimer(),
    )
    train = [trainer.train_single_step(batch) for batch in itertools.islice(train_loader, 3)]
    _, val = trainer.run_validation()
    return {"train": train, "val": val, "model": model, "caches": caches}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, pair_files, tokenizer) -> tuple[dict, dict]:
    root = tmp_path_factory.mktemp("runs")
    model_dir = tiny_model_dir("llama")
    online = run(root / "online", model_dir, pair_files, tokenizer, precompute=False)
    return online, run(root / "precompute", model_dir, pair_files, tokenizer, precompute=True)


def assert_same_metrics(online: dict[str, float], precompute: dict[str, float]) -> None:
    assert online.keys() == precompute.keys()
    assert "ref_logps_chosen_mean" in precompute
    for key, value in online.items():
        assert precompute[key] == pytest.approx(value, abs=1e-5), key


def test_training_with_cache_matches_online_reference(runs):
    online, precompute = runs
    assert isinstance(precompute["model"].reference, CachedReference), "the reference model must be freed"
    assert len(online["train"]) == len(precompute["train"]) == 3
    assert online["train"][2]["rewards_chosen_mean"] != pytest.approx(0.0, abs=1e-4), "the policy should move"
    for a, b in zip(online["train"], precompute["train"], strict=True):
        assert_same_metrics(a, b)


def test_validation_uses_its_own_cache(runs):
    online, precompute = runs
    train_cache, val_cache = precompute["caches"]
    assert val_cache.path.is_file() and val_cache.path != train_cache.path
    assert len(val_cache) == 16 and val_cache.path.parent.name == "reference"
    assert online["val"]["reward_margin_mean"] != pytest.approx(0.0, abs=1e-4)
    assert_same_metrics(online["val"], precompute["val"])


@pytest.mark.slow
def test_stale_cache_is_rebuilt_and_current_one_loaded(tmp_path, tiny_model_dir, pair_files, tokenizer):
    model_dir = save_tiny(
        build_tiny_model("llama", len(tokenizer), hidden_size=32, num_layers=2, num_heads=4),
        tokenizer,
        tmp_path / "m",
    )
    cache_dir = tmp_path / "ref"
    dataset = PreferenceDataset(pair_files["validation"], tokenizer, MAX_LEN)

    def cache_for(data: PreferenceDataset) -> ReferenceCache:
        return build_cache(build(model_dir, pair_files, tmp_path), data, tokenizer, cache_dir, model_dir)

    first = cache_for(dataset)
    assert not first.from_cache
    mtime = first.path.stat().st_mtime_ns
    # same inputs: loaded, not recomputed (there is no reference model to recompute with)
    no_reference = build(model_dir, pair_files, tmp_path)
    no_reference.reference = NoReference()
    again = build_cache(no_reference, dataset, tokenizer, cache_dir, model_dir)
    assert again.from_cache and again.path == first.path and first.path.stat().st_mtime_ns == mtime
    assert torch.equal(again.logps, first.logps)

    changed_pairs = make_pairs(16, seed=2)  # the validation file, one response changed
    changed_pairs[7]["chosen_response"] = sentence(random.Random(9), 5)
    other_tokenizer = train_tokenizer([sentence(random.Random(1), 10) for _ in range(300)], vocab_size=280)
    variants = {
        "data": PreferenceDataset(write_jsonl(tmp_path / "changed.jsonl", changed_pairs), tokenizer, MAX_LEN),
        "tokenizer": PreferenceDataset(pair_files["validation"], other_tokenizer, MAX_LEN),
        "max_seq_length": PreferenceDataset(pair_files["validation"], tokenizer, MAX_LEN - 8),
    }
    paths = {first.path}
    for name, data in variants.items():
        rebuilt = cache_for(data)
        assert not rebuilt.from_cache and rebuilt.path not in paths, name
        paths.add(rebuilt.path)
    # a perturbed model re-saved over the same directory
    model = build(model_dir, pair_files, tmp_path)
    perturb(model.policy, 0.01)
    model.policy.save_pretrained(model_dir)
    rebuilt = cache_for(dataset)
    assert not rebuilt.from_cache and rebuilt.path not in paths
    assert (rebuilt.logps - first.logps).abs().max() > 1e-3
    assert first.path.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in cache_dir.iterdir()) == sorted(p.name for p in {*paths, rebuilt.path})


@pytest.mark.parametrize("safe", [True, False])
def test_model_fingerprint_covers_every_shard_config_and_dtype(tmp_path, tokenizer, safe):
    model = build_tiny_model("llama", len(tokenizer), hidden_size=32, num_layers=2, num_heads=4)
    model.save_pretrained(tmp_path, max_shard_size="20KB", safe_serialization=safe)
    shards = sorted(p for p in tmp_path.iterdir() if p.suffix in (".safetensors", ".bin"))
    assert len(shards) > 2
    base = model_fingerprint(tmp_path, "float32")
    assert model_fingerprint(tmp_path, "float32") == base
    assert model_fingerprint(tmp_path, "bfloat16") != base
    for path in [*shards, tmp_path / "config.json"]:
        original = path.read_bytes()
        middle = len(original) // 2
        path.write_bytes(original[:middle] + bytes([original[middle] ^ 1]) + original[middle + 1 :])
        assert model_fingerprint(tmp_path, "float32") != base, path.name
        path.write_bytes(original)
    assert model_fingerprint(tmp_path, "float32") == base


def test_misuse_raises(tmp_path, tiny_model_dir, pair_files, tokenizer):
    model_dir = tiny_model_dir("llama")
    dataset = PreferenceDataset(pair_files["validation"], tokenizer, MAX_LEN)
    model = build(model_dir, pair_files, tmp_path)
    model.reference = NoReference()
    with pytest.raises(ValueError, match="no reference model"):
        build_cache(model, dataset, tokenizer, tmp_path / "ref", model_dir)
    model.reference = FrozenReference(SequenceLogprobs(model.policy))
    with pytest.raises(ValueError, match="is the policy"):
        build_cache(model, dataset, tokenizer, tmp_path / "ref", model_dir)
    with pytest.raises(ValueError, match="carry no cached reference"):
        with_cached_reference(collate_for(tokenizer))([dataset[0], dataset[1]])
    with pytest.raises(ValueError, match="local directory"):
        model_fingerprint(tmp_path / "absent", "float32")
    empty = tmp_path / "empty"
    shutil.copytree(model_dir, empty, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(ValueError, match=r"no \*\.safetensors"):
        model_fingerprint(empty, "float32")
