"""``reference.mode: precompute``: the reference model's log-probs of every pair, computed once and cached.

Before training, one eval-mode, no-grad pass of the reference model (``DPOModel.reference``, never the
policy) over each dataset gives every pair's summed response log-probs (chosen, rejected) in fp32. They
are saved as ``<dir>/<dataset fingerprint>-<model fingerprint>.pt``, so a changed data file, tokenizer,
``max_seq_length``, weights, model config or dtype selects a new file (rebuilt), and a resumed run loads
the existing one. The reference model is then freed. A ``ReferenceCache`` is the dataset with each pair
carrying its ``ref_logps``; ``with_cached_reference`` puts those into the micro-batches'
``MicroBatch.ref_logps``, which ``DPOModel.get_loss_and_metrics`` uses (averaging them over its own token
counts when the loss averages); the model's reference becomes a ``CachedReference``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from preftune.data.batch import MicroBatch, as_micro_batch, pair_length
from preftune.data.checked_file import load_checked, save_checked
from preftune.data.dataset import PreferenceDataset
from preftune.modeling.hub import local_model_dir
from preftune.modeling.model import DPOModel
from preftune.modeling.parallel import barrier, gather_objects
from preftune.modeling.reference import CachedReference, FrozenReference, NoReference

CACHE_VERSION = 1  # bump when the computation changes: every cached file becomes stale
WEIGHT_SUFFIXES = (".safetensors", ".bin")

Collate = Callable[[Sequence[dict[str, Any]]], list[MicroBatch]]


def model_fingerprint(model_path: str | Path, dtype: str) -> str:
    """A hash of a local model directory's weights (every ``*.safetensors``/``*.bin`` file, all shards, and
    the shard indexes), its ``config.json``, ``dtype`` and ``CACHE_VERSION``."""
    root = Path(model_path)
    if not root.is_dir():
        raise ValueError(f"reference.mode=precompute needs model.path to be a local directory: {model_path}")
    files = sorted(
        p
        for p in root.iterdir()
        if p.is_file()
        and (p.suffix in WEIGHT_SUFFIXES or p.name.endswith(".index.json") or p.name == "config.json")
    )
    if not any(p.suffix in WEIGHT_SUFFIXES for p in files):
        raise ValueError(f"no *.safetensors or *.bin weight files in {root}")
    h = hashlib.sha256(json.dumps([CACHE_VERSION, dtype]).encode())
    for path in files:
        h.update(json.dumps([path.name, path.stat().st_size]).encode())
        with path.open("rb") as f:
            while block := f.read(1 << 24):
                h.update(block)
    return h.hexdigest()[:24]


def reference_model_fingerprint(model_cfg: Any, reference_path: str | None) -> str:
    """``model_fingerprint`` of the model the reference is: ``reference_path``, else the starting policy
    (``model.path``; its base for LoRA; in nf4 with ``model.load_in_4bit``, as the adapters-off base is)."""
    quantized = model_cfg.load_in_4bit and reference_path is None
    return model_fingerprint(
        local_model_dir(reference_path or model_cfg.path), model_cfg.dtype + "+nf4" * quantized
    )


@torch.no_grad()
def compute_reference_logps(
    model: DPOModel,
    dataset: PreferenceDataset,
    collate_fn: Collate,
    indices: Sequence[int],
    *,
    batch_pairs: int,
) -> Tensor:
    """Reference log-probs [len(indices), 2] (chosen, rejected; fp32, summed over response tokens) of
    ``dataset[indices]``, in ``indices`` order. A rank of a distributed run can compute its slice and
    all-gather."""
    if isinstance(model.reference, (NoReference, CachedReference)):
        raise ValueError(f"no reference model to precompute reference log-probs from ({model.reference})")
    if isinstance(model.reference, FrozenReference) and model.reference.model is model.policy:
        raise ValueError("the reference model is the policy being trained")
    device = model.device
    row_of = {index: row for row, index in enumerate(indices)}
    out = torch.full((len(indices), 2), float("nan"))
    quiet = None if model.dist.is_main else True  # None: tqdm shows the bar on a terminal only
    with tqdm(total=len(indices), desc="reference log-probs", unit=" pairs", disable=quiet) as progress:
        for start in range(0, len(indices), batch_pairs):
            pairs = [dataset[i] for i in indices[start : start + batch_pairs]]
            for batch in collate_fn(pairs):
                logps = model.reference.logprobs(batch.to(device))
                rows = [row_of[i] for i in batch.indices.tolist()]
                out[rows] = logps.view(2, -1).t().cpu()
            progress.update(len(pairs))
    if out.isnan().any():
        raise RuntimeError(f"collate_fn left {int(out.isnan().any(1).sum())} pairs without log-probs")
    return out


class ReferenceCache(torch.utils.data.Dataset):
    """A dataset whose pairs carry their reference log-probs: ``dataset[i]`` plus ``ref_logps``
    (chosen, rejected). ``logps`` [N, 2] holds them all (fp32, summed over response tokens)."""

    def __init__(self, dataset: PreferenceDataset, logps: Tensor, path: Path, from_cache: bool):
        if logps.shape != (len(dataset), 2):
            raise ValueError(f"{path}: log-probs of shape {tuple(logps.shape)} for {len(dataset)} pairs")
        self.dataset = dataset
        self.logps = logps
        self.path = path
        self.from_cache = from_cache

    @classmethod
    def load_or_build(
        cls,
        model: DPOModel,
        dataset: PreferenceDataset,
        collate_fn: Collate,
        path_dir: str | Path,
        *,
        model_fingerprint: str,
        batch_pairs: int,
    ) -> ReferenceCache:
        """Load ``<path_dir>/<dataset fingerprint>-<model fingerprint>.pt``, or compute it with the reference
        model (longest pairs first, so running out of memory shows at once) and save it atomically."""
        path = Path(path_dir) / f"{dataset.fingerprint}-{model_fingerprint}.pt"
        cached = load_checked(path)
        if cached is not None:
            return cls(dataset, cached, path, from_cache=True)
        barrier(model.dist)  # every rank has looked before rank 0 writes the file

        order = sorted(range(len(dataset)), key=lambda i: pair_length(dataset[i], "padded"), reverse=True)
        info = model.dist
        # FSDP2's forwards are collectives, so every rank runs all of them; otherwise each rank takes a slice.
        share = (
            order
            if not info.distributed or model.reference.collective
            else order[info.rank :: info.world_size]
        )
        part = compute_reference_logps(model, dataset, collate_fn, share, batch_pairs=batch_pairs)
        logps = torch.empty(len(dataset), 2)
        for indices, values in gather_objects((share, part), info):
            logps[indices] = values
        if info.is_main:
            save_checked(logps, path)
        barrier(info)
        return cls(dataset, logps, path, from_cache=False)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.dataset[index], "ref_logps": self.logps[index].tolist()}


def precompute_reference(
    model: DPOModel,
    datasets: Sequence[PreferenceDataset | None],
    collate_fn: Collate,
    path_dir: str | Path,
    *,
    model_fingerprint: str,
    batch_pairs: int,
) -> list[ReferenceCache | None]:
    """``ReferenceCache.load_or_build`` for each dataset (None stays None), then free the reference model: the
    model's reference becomes a ``CachedReference``."""
    caches = [
        ReferenceCache.load_or_build(
            model, d, collate_fn, path_dir, model_fingerprint=model_fingerprint, batch_pairs=batch_pairs
        )
        if d is not None
        else None
        for d in datasets
    ]
    model.reference = CachedReference()
    return caches


def with_cached_reference(collate_fn: Collate) -> Collate:
    """``collate_fn`` whose micro-batches also carry ``ref_logps`` [2P], taken by dataset index from the
    pairs' ``ref_logps`` (pairs from a ``ReferenceCache``)."""

    def collate(pairs: Sequence[dict[str, Any]]) -> list[MicroBatch]:
        missing = [pair["index"] for pair in pairs if "ref_logps" not in pair]
        if missing:
            raise ValueError(
                f"pairs {missing[:5]} carry no cached reference log-probs: with reference.mode=precompute "
                f"every dataloader must read a ReferenceCache"
            )
        by_index = {pair["index"]: pair["ref_logps"] for pair in pairs}
        batches = []
        for batch in map(as_micro_batch, collate_fn(pairs)):
            ref = torch.tensor([by_index[i] for i in batch.indices.tolist()], dtype=torch.float32)
            batches.append(
                replace(batch, ref_logps=torch.cat([ref[:, 0], ref[:, 1]]).to(batch.indices.device))
            )
        return batches

    return collate
