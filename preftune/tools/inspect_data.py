"""``preftune inspect``: read and tokenize the configured data exactly as training would, and report it.

Per file: the detected format, pairs kept (in a weighted mixture: and drawn per epoch), pairs dropped and
why (with the first place each reason occurred), token-length percentiles of prompts and responses,
duplicate prompts, and the first pair with the tokens the loss trains on marked. ``--json`` writes the same report as JSON.
"""

from __future__ import annotations

import hashlib
import json
import math
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from preftune.config import PreftuneConfig
from preftune.data.batch import dpo_custom_collate
from preftune.data.chat import tokenizer_template
from preftune.data.dataset import PreferenceDataset, TokenizedPairs
from preftune.data.loading import load_datasets
from preftune.data.mixture import WeightedPairs
from preftune.run_dir import RunDir

PERCENTILES = (50, 90, 99, 100)
MARK_OPEN, MARK_CLOSE = "⟦", "⟧"  # around the trained (labelled) tokens in the rendered first pair


def _percentiles(values: np.ndarray) -> dict[str, int]:
    ordered = np.sort(values)
    return {
        ("max" if p == 100 else f"p{p}"): int(ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)])
        for p in PERCENTILES
    }


def _lengths(store: TokenizedPairs, field: str, rows: np.ndarray) -> np.ndarray:
    """Token counts of ``field`` of the pairs at ``rows``, from the store's offsets (no token is read)."""
    offsets = store.columns[f"{field}_offsets"].numpy()
    return offsets[rows + 1] - offsets[rows]


def _duplicate_prompts(store: TokenizedPairs, rows: np.ndarray) -> dict[str, int]:
    """Prompts shared by several pairs, and those pairs, counted from an 8-byte digest of each prompt."""
    tokens = memoryview(store.columns["prompt_ids"].numpy())
    offsets = store.columns["prompt_ids_offsets"].numpy()
    starts, ends = offsets[rows].tolist(), offsets[rows + 1].tolist()
    digests = np.empty(len(rows), dtype=np.uint64)
    for k, (start, end) in enumerate(zip(starts, ends, strict=True)):
        digests[k] = int.from_bytes(hashlib.blake2b(tokens[start:end], digest_size=8).digest(), "little")
    counts = np.unique(digests, return_counts=True)[1]
    shared = counts[counts > 1]
    return {"prompts": len(shared), "pairs": int(shared.sum())}


def _render(tokenizer: Any, example: dict[str, Any]) -> dict[str, str]:
    """Prompt+response of each side, decoded, with the tokens that carry labels in the collate marked."""
    batch = dpo_custom_collate([example], eos_id=tokenizer.eos_token_id)
    out = {}
    for side in ("chosen", "rejected"):
        ids = batch[side][0, : batch[f"{side}_length"][0]].tolist()
        labelled = (batch[f"{side}_labels"][0, : len(ids)] != -100).tolist()
        start = labelled.index(True)
        out[side] = (
            tokenizer.decode(ids[:start], skip_special_tokens=False)
            + MARK_OPEN
            + tokenizer.decode(ids[start:], skip_special_tokens=False)
            + MARK_CLOSE
        )
    return out


def file_reports(dataset: PreferenceDataset, tokenizer: Any) -> list[dict[str, Any]]:
    """One report per file of ``dataset``."""
    reports = []
    file_of = dataset.origins[:, 0].numpy()
    for i, stats in enumerate(dataset.file_stats):
        rows = np.flatnonzero(file_of == i)
        first_drop: dict[str, str] = {}
        for f, _, n, reason in dataset.drops:
            if f == i and reason not in first_drop:
                first_drop[reason] = dataset.where(f, n)
        report: dict[str, Any] = {
            "path": stats.path,
            "format": stats.format,
            "records": stats.records,
            "kept": stats.kept,
            "dropped": dict(sorted(stats.dropped.items())),
            "first_dropped_at": first_drop,
            "tokens": {
                side: _percentiles(_lengths(dataset.examples, f"{side}_ids", rows))
                for side in ("prompt", "chosen", "rejected")
            }
            if len(rows)
            else {},
            "duplicate_prompts": _duplicate_prompts(dataset.examples, rows),
            "first_pair": None,
        }
        if len(rows):
            first = dataset.examples[int(rows[0])]
            report["first_pair"] = {
                "at": dataset.where(i, int(dataset.origins[rows[0], 2])),
                **{f"{side}_tokens": len(first[f"{side}_ids"]) for side in ("prompt", "chosen", "rejected")},
                **_render(tokenizer, first),
            }
        reports.append(report)
    return reports


def _text(report: dict[str, Any]) -> str:
    lines = [
        f"model {report['model']}, max_seq_length {report['max_seq_length']}, "
        f"chat template: {report['chat_template'] or 'none'}"
    ]
    for dataset in report["datasets"]:
        lines.append(f"== {dataset['name']}: {dataset['pairs']} pairs ({dataset['source']})")
        for f in dataset["files"]:
            dropped = sum(f["dropped"].values())
            lines.append(f"{f['path']}")
            lines.append(
                f"  format {f['format']}: {f['records']} records, {f['kept']} pairs kept, {dropped} dropped"
            )
            if "weight" in f:
                lines.append(
                    f"  weight {f['weight']:g}: {f['kept']} pairs -> {f['weighted']} drawn per epoch"
                )
            for reason, n in f["dropped"].items():
                lines.append(f"    {n} {reason} (first at {f['first_dropped_at'][reason]})")
            if f["tokens"]:
                lines.append("  tokens    " + "".join(f"{k:>8}" for k in f["tokens"]["prompt"]))
                for side, values in f["tokens"].items():
                    lines.append(f"  {side:<10}" + "".join(f"{v:>8}" for v in values.values()))
            dup = f["duplicate_prompts"]
            lines.append(f"  duplicate prompts: {dup['prompts']} prompts shared by {dup['pairs']} pairs")
            pair = f["first_pair"]
            if pair:
                lines.append(
                    f"  first pair ({pair['at']}), trained tokens between {MARK_OPEN} and {MARK_CLOSE}:"
                )
                for side in ("chosen", "rejected"):
                    lines.append(f"    {side}:")
                    lines.append(textwrap.indent(pair[side], "      "))
    return "\n".join(lines)


def inspect_data(cfg: PreftuneConfig, tokenizer: Any) -> dict[str, Any]:
    """The report of ``inspect`` as a dict (what ``--json`` writes)."""
    data = cfg.data
    train, val = load_datasets(data, tokenizer, RunDir(cfg.output_dir).tokenized(data.cache_dir))
    if data.chat_template:
        template = "data.chat_template"
    else:
        template = "the tokenizer's" if tokenizer_template(tokenizer) is not None else None
    train_files = file_reports(train.dataset if isinstance(train, WeightedPairs) else train, tokenizer)
    if isinstance(train, WeightedPairs):  # each source's pairs before and after weighting
        for report_of_file, count in zip(train_files, train.counts, strict=True):
            report_of_file.update(weight=count.weight, weighted=count.drawn)
    report: dict[str, Any] = {
        "model": str(cfg.model.path),
        "max_seq_length": data.max_seq_length,
        "chat_template": template,
        "datasets": [{"name": "train", "source": "data.train", "pairs": len(train), "files": train_files}],
    }
    if val is not None:
        source = (
            f"data.validation_fraction={data.validation_fraction} of data.train, seed {data.seed}"
            if data.validation_fraction is not None
            else "data.validation"
        )
        report["datasets"].append(
            {"name": "validation", "source": source, "pairs": len(val), "files": file_reports(val, tokenizer)}
        )
    return report


def run_inspect(cfg: PreftuneConfig, json_path: str | Path | None) -> int:
    """Print the data report of ``cfg`` (and write it as JSON to ``json_path``); the exit status."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    report = inspect_data(cfg, tokenizer)
    print(_text(report))
    if json_path is not None:
        Path(json_path).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0
