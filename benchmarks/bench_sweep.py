"""A 6-trial ``preftune sweep`` against the same 6 trials as separate ``preftune train`` runs, on one machine in
one invocation, each command a process of its own timed from start to exit.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_sweep.py --output runs/bench/bench_sweep.json

The workload makes tokenization and the reference pass a real share of a run: 3,000 training and 300
validation pairs (seeded pseudo-words, about 120 tokens a pair) with a 2k-token BPE and a tiny Llama; each
trial trains 4 steps of 16 pairs with ``reference.mode: precompute``. The sweep is a 3 x 2 grid
(``dpo.ref_policy_kl_penalty`` x ``dpo.preference_loss`` in dpo, ipo). Each separate run trains one trial's
own ``config.yaml`` with its caches in its own directory (``data.cache_dir=null reference.cache_dir=null``),
so it tokenizes and precomputes anew, as six hand-started runs would. Their final ``val/loss`` must equal
the trial's. Prints (and writes) JSON: wall times, the ratio sweep / separate, the sweep's work counts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_tokenize import preftune, run, texts, words
from json_report import emit

GRID = ["dpo.ref_policy_kl_penalty=0.05,0.1,0.5", "dpo.preference_loss=dpo,ipo"]
WORDS = (10, 40)  # prompt and response lengths, in words


def write_pairs(path: Path, n: int, seed: int) -> None:
    vocab, rng = words(), np.random.default_rng(seed)
    columns = zip(*(texts(rng, vocab, n, *WORDS) for _ in range(3)), strict=True)
    path.write_text(
        "".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in columns)
    )


def build(work: Path, pairs: int) -> Path:
    """The model, the data and the base config."""
    from preftune.tools.tiny import build_tiny_model, save_tiny, train_tokenizer

    rng = np.random.default_rng(1)
    tokenizer = train_tokenizer(texts(rng, words(), 2000, *WORDS), vocab_size=2000)
    model = build_tiny_model("llama", len(tokenizer), hidden_size=64, num_layers=2, num_heads=4)
    save_tiny(model, tokenizer, work / "model")
    write_pairs(work / "train.jsonl", pairs, seed=2)
    write_pairs(work / "validation.jsonl", pairs // 10, seed=3)
    base = work / "base.yaml"
    base.write_text(
        f"model: {{path: {work / 'model'}}}\n"
        f"data: {{train: {work / 'train.jsonl'}, validation: {work / 'validation.jsonl'}, max_seq_length: 256,\n"
        "       micro_batch_size: 16, global_batch_size: 16}\n"
        "reference: {mode: precompute}\n"
        "optim: {lr: 1.0e-3}\n"
        "trainer: {max_steps: 4, val_check_interval: 4, save_interval: 4, limit_val_batches: 4,\n"
        "          val_before_training: false}\n"
    )
    return base


def final_val_loss(run_dir: Path) -> float:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "val/loss" in r][-1]["val/loss"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=3000)
    p.add_argument("--work", type=Path, default=Path("runs/bench/sweep"))
    p.add_argument("--output", type=Path, help="also write the JSON here")
    args = p.parse_args()
    work = args.work.resolve()
    if work.exists() and any(work.iterdir()):
        sys.exit(f"{work} is not empty: pass a new --work")
    work.mkdir(parents=True, exist_ok=True)
    base = build(work, args.pairs)

    sweep_dir = work / "sweep"
    sweep = run(preftune("sweep", "--config", str(base), "--output-dir", str(sweep_dir), "--grid", *GRID))
    result = json.loads((sweep_dir / "sweep.json").read_text())
    separate = []
    for trial in result["trials"]:
        alone = work / f"alone_{trial['dir']}"
        cfg = str(sweep_dir / trial["dir"] / "config.yaml")
        timing = run(
            preftune(
                "train",
                "--config",
                cfg,
                f"output_dir={alone}",
                "data.cache_dir=null",
                "reference.cache_dir=null",
            )
        )
        if abs(final_val_loss(alone) - trial["metric"]) > 1e-5:
            sys.exit(
                f"{trial['dir']}: val/loss {trial['metric']} in the sweep, {final_val_loss(alone)} alone"
            )
        separate.append(timing["wall_s"])
    out = {
        "machine": {"cpus": len(os.sched_getaffinity(0)), "time": time.strftime("%Y-%m-%d %H:%M")},
        "train_pairs": args.pairs,
        "trials": len(result["trials"]),
        "sweep_wall_s": sweep["wall_s"],
        "separate_wall_s": round(sum(separate), 1),
        "separate_runs_wall_s": separate,
        "ratio": round(sweep["wall_s"] / sum(separate), 3),
        "sweep_tokenizations": result["tokenizations"],
        "sweep_reference_passes": result["reference_passes"],
        "best": result["best"],
    }
    emit(out, args.output, indent=1)


if __name__ == "__main__":
    main()
