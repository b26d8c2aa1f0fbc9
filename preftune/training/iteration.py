"""One iteration of iterative DPO (``online.iterations``): the policy's completions of the iteration's prompts,
judged and paired, written as a preference file the ordinary offline recipe trains on.

The prompts are generated for in chunks (``data.global_batch_size`` prompts each); a chunk's lines and pairs are
written to ``iterations/NNN/chunks/CCCCC.json`` at once (a temporary file, then renamed), so a killed run
resumes after its last complete chunk. Each prompt's completions are sampled from a generator seeded by
(``data.seed``, the iteration, the prompt's index), so the resumed iteration equals a straight one.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from preftune.data.prompts import PromptSet
from preftune.training.online import OnlineStep, StepCounts

PAIRS = "pairs.jsonl"


@dataclass
class IterationData:
    """What an iteration's generation gave."""

    records: list[dict]  # its generations.jsonl lines (with ``iteration``), in prompt order
    pairs: list[dict]  # its preference records (format ``tokenized``), in prompt order
    metrics: dict[str, float]  # the online step's generation metrics over the whole iteration


def iteration_prompts(num_prompts: int, per_iteration: int | None, seed: int, iteration: int) -> list[int]:
    """The prompt indices of ``iteration``: all of them, or ``per_iteration`` drawn by (``seed``,
    ``iteration``), in index order."""
    if per_iteration is None or per_iteration >= num_prompts:
        return list(range(num_prompts))
    return sorted(random.Random(f"{seed}:{iteration}").sample(range(num_prompts), per_iteration))


def write_atomically(path: Path, text: str) -> None:
    """``text`` into ``path``: a temporary file beside it, renamed, so ``path`` is whole or absent."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def iteration_pair(pair: dict[str, Any], decode: Callable[..., str]) -> dict[str, Any]:
    """A generated pair as a preference record of format ``tokenized``: the token ids as sampled (what is
    trained: decoded text need not encode back to them), their texts for reading, and the judged rewards."""
    return {
        "prompt": decode(pair["prompt_ids"], skip_special_tokens=True),
        "chosen": decode(pair["chosen_ids"], skip_special_tokens=True),
        "rejected": decode(pair["rejected_ids"], skip_special_tokens=True),
        **{key: list(pair[key]) for key in ("prompt_ids", "chosen_ids", "rejected_ids")},
        "chosen_reward": pair["chosen_reward"],
        "rejected_reward": pair["rejected_reward"],
    }


def generate_iteration(
    make_step: Callable[[], OnlineStep],
    prompts: PromptSet,
    indices: Sequence[int],
    iteration: int,
    directory: Path,
    *,
    chunk_size: int,
    log: Callable[[str], None],
) -> IterationData:
    """Generate, judge and pair for ``indices`` of ``prompts`` chunk by chunk into ``directory/chunks``
    (complete chunks of an earlier, killed run are kept; ``make_step`` loads the policy and judge only when a
    chunk is left to generate)."""
    chunks = directory / "chunks"
    chunks.mkdir(parents=True, exist_ok=True)
    starts = range(0, len(indices), chunk_size)
    done = sum((chunks / f"{c:05d}.json").is_file() for c in range(len(starts)))
    if done:
        log(f"iteration {iteration}: {done} of {len(starts)} generation chunks done before, continuing")
    records, pairs, counts, seconds, step = [], [], [], 0.0, None
    for c, start in enumerate(starts):
        path = chunks / f"{c:05d}.json"
        if not path.is_file():
            step = step or make_step()
            batch = step([prompts[i] for i in indices[start : start + chunk_size]], iteration)
            lines = [
                {"iteration": iteration, **{k: v for k, v in r.items() if k != "step"}} for r in batch.records
            ]
            chunk = {
                "records": lines,
                "pairs": [iteration_pair(p, step.tokenizer.decode) for p in batch.pairs],
                "counts": vars(batch.counts),
                "seconds": batch.generation_time,
            }
            write_atomically(path, json.dumps(chunk))
        chunk = json.loads(path.read_text())
        records += chunk["records"]
        pairs += chunk["pairs"]
        counts.append(StepCounts(**chunk["counts"]))
        seconds += chunk["seconds"]
    return IterationData(records, pairs, StepCounts.merge(counts).metrics(seconds))


def write_pairs(directory: Path, pairs: list[dict]) -> Path:
    """The iteration's preference file (written whole or not at all)."""
    path = directory / PAIRS
    write_atomically(path, "".join(json.dumps(pair) + "\n" for pair in pairs))
    return path


def write_generations(path: Path, records: list[dict]) -> None:
    """``output_dir/generations.jsonl``: every finished iteration's lines, rewritten whole."""
    write_atomically(path, "".join(json.dumps(record) + "\n" for record in records))
