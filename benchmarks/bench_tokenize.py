"""Cold tokenization, whole process: TRL's ``DPOTrainer`` data preparation beside ``preftune inspect``.

    .venv/bin/python -m pip install -q -e '.[bench]'                 # TRL (keep torch==2.13.0+cpu)
    .venv/bin/python benchmarks/bench_tokenize.py                     # 20k pairs: TRL, inspect cold/warm, train
    .venv/bin/python benchmarks/bench_tokenize.py --pairs 1000000 --no-trl   # a million pairs of ~500 tokens

Pairs are generated (seeded) from pseudo-words: prompts 40-200 words, responses 20-200 words, about 500 BPE
tokens a pair with the 8k-token byte-level BPE trained here on the same word distribution; TRL's prompt,
chosen and rejected columns. Each command runs in its own process, timed from start to exit; its peak
resident memory comes from the kernel (``wait4``). ``baseline`` is the same command on 10 pairs (imports,
tokenizer, model), so ``added_mib`` over the token store is what the data costs. ``reload`` opens the cache
as training does and reports the resident memory that added (the cache is mapped, not read). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

SYLLABLES = (
    "ka to ri men sa lo ve dun pi ra tes no mu gar li fe bo qua zi ho ne tal ur py sen dra mo ki".split()
)
PROMPT_WORDS, RESPONSE_WORDS = (40, 200), (20, 200)
BLOCK = 10_000  # pairs generated at a time


def words(seed: int = 0, n: int = 20_000) -> list[str]:
    rng = random.Random(seed)
    out = {"".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(n)}
    return sorted(out)


def texts(rng: np.random.Generator, vocab: list[str], n: int, lo: int, hi: int) -> list[str]:
    lengths = rng.integers(lo, hi + 1, n)
    ids = rng.integers(0, len(vocab), int(lengths.sum())).tolist()
    out, start = [], 0
    for length in lengths.tolist():
        out.append(" ".join(map(vocab.__getitem__, ids[start : start + length])))
        start += length
    return out


def write_pairs(path: Path, n: int) -> None:
    """``n`` TRL-format pairs, written block by block (never all in memory)."""
    vocab, rng = words(), np.random.default_rng(0)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        for start in range(0, n, BLOCK):
            k = min(BLOCK, n - start)
            columns = zip(
                texts(rng, vocab, k, *PROMPT_WORDS),
                texts(rng, vocab, k, *RESPONSE_WORDS),
                texts(rng, vocab, k, *RESPONSE_WORDS),
                strict=True,
            )
            f.writelines(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in columns)
    tmp.replace(path)


def build_model(out: Path) -> None:
    from preftune.tools.tiny import build_tiny_model, save_tiny, train_tokenizer

    rng = np.random.default_rng(1)
    tokenizer = train_tokenizer(texts(rng, words(), 2000, *PROMPT_WORDS), vocab_size=8000)
    model = build_tiny_model("llama", len(tokenizer), hidden_size=64, num_layers=2, num_heads=4)
    save_tiny(model, tokenizer, out)


def run(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Wall time, CPU time (all threads) and peak RSS (the kernel's ru_maxrss) of ``cmd``, run to its end."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        out.seek(0), err.seek(0)
        if os.waitstatus_to_exitcode(status):
            sys.exit(f"failed: {' '.join(cmd)}\n{err.read().decode()[-3000:]}")
        out = out.read().decode()
    cpu = usage.ru_utime + usage.ru_stime
    return {
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "peak_rss_mib": round(usage.ru_maxrss / 1024),
        "stdout": out,
    }


def config(work: Path, model: Path, data: Path, name: str) -> Path:
    path = work / f"{name}.yaml"
    path.write_text(
        f"model:\n  path: {model}\noutput_dir: {work / name}\n"
        f"data:\n  train: {data}\n  max_seq_length: 1024\n  micro_batch_size: 1\n  global_batch_size: 1\n"
    )
    return path


def child(kind: str, pairs: int, data: Path, work: Path) -> list[str]:
    """The command of one of this script's measured child processes (``--child KIND``)."""
    return [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--pairs",
        str(pairs),
        "--data",
        str(data),
        "--work",
        str(work),
    ]


def preftune(*args: str) -> list[str]:
    return [sys.executable, "-m", "preftune", *args]


def child_trl(data: Path, model_dir: Path, work: Path) -> None:
    """What a TRL user runs before the first step: load the JSONL, build the trainer (it tokenizes)."""
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    dataset = load_dataset("json", data_files=str(data), split="train", cache_dir=str(work / "hf-datasets"))
    args = DPOConfig(
        output_dir=str(work / "trl-out"),
        report_to=[],
        per_device_train_batch_size=1,
        bf16=False,
        use_cpu=True,
    )
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    print(json.dumps({"pairs": len(trainer.train_dataset)}))


def child_reload(data: Path, model_dir: Path, cache_dir: Path) -> None:
    """Open the warm cache as training does; the resident memory that adds and the time it takes."""
    from transformers import AutoTokenizer

    from preftune.data.dataset import PreferenceDataset

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    before, start = rss_mib(), time.perf_counter()
    dataset = PreferenceDataset(data, tokenizer, 1024, cache_dir)
    seconds = time.perf_counter() - start
    store = sum(c.nbytes for c in dataset.examples.columns.values()) / 2**20
    print(
        json.dumps(
            {
                "from_cache": dataset.from_cache,
                "pairs": len(dataset),
                "tokens": sum(
                    len(dataset.examples.columns[f]) for f in ("prompt_ids", "chosen_ids", "rejected_ids")
                ),
                "token_store_mib": round(store),
                "reload_s": round(seconds, 1),
                "reload_added_rss_mib": round(rss_mib() - before),
                "first_pair_tokens": len(dataset[0]["prompt_ids"]),
            }
        )
    )


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=20_000)
    p.add_argument("--work", type=Path, default=Path("runs/bench/tokenize"))
    p.add_argument("--no-trl", action="store_true", help="skip TRL (at a million pairs it runs for long)")
    p.add_argument("--child", choices=["trl", "reload"], help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    work = args.work.resolve()
    model = work / "model"
    if args.child == "trl":
        child_trl(args.data, model, work / f"trl-{args.pairs}")
        return
    if args.child == "reload":
        child_reload(args.data, model, work / f"inspect-{args.pairs}" / "cache" / "tokenized")
        return

    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if not (model / "tokenizer.json").is_file():
        build_model(model)
    data, small = work / f"pairs-{args.pairs}.jsonl", work / "pairs-10.jsonl"
    for path, n in ((data, args.pairs), (small, 10)):
        if not path.is_file():
            write_pairs(path, n)
    result: dict[str, Any] = {
        "pairs": args.pairs,
        "data_mib": round(data.stat().st_size / 2**20),
        "prepare_s": round(time.perf_counter() - start, 1),
        "cpus": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
    }
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    if not args.no_trl:
        shutil.rmtree(work / f"trl-{args.pairs}", ignore_errors=True)  # a cold datasets cache
        trl = run(child("trl", args.pairs, data, work), env)
        result["trl"] = {k: v for k, v in trl.items() if k != "stdout"} | json.loads(trl["stdout"])

    shutil.rmtree(work / "inspect-10", ignore_errors=True)
    result["inspect_baseline"] = run(
        preftune("inspect", "--config", str(config(work, model, small, "inspect-10"))), env
    )
    cfg = config(work, model, data, f"inspect-{args.pairs}")
    shutil.rmtree(work / f"inspect-{args.pairs}", ignore_errors=True)
    result["inspect_cold"] = run(preftune("inspect", "--config", str(cfg)), env)
    result["inspect_warm"] = run(preftune("inspect", "--config", str(cfg)), env)
    reload = run(child("reload", args.pairs, data, work), env)
    result["reload"] = json.loads(reload["stdout"]) | {"process_peak_rss_mib": reload["peak_rss_mib"]}
    store = result["reload"]["token_store_mib"]
    cache_dir = str(work / f"inspect-{args.pairs}" / "cache" / "tokenized")
    train_args = ["trainer.max_steps=1", "trainer.val_check_interval=100", f"data.cache_dir={cache_dir}"]
    shutil.rmtree(work / "train-10", ignore_errors=True)
    train_small = config(work, model, small, "train-10")
    result["train_baseline"] = run(preftune("train", "--config", str(train_small), *train_args[:2]), env)
    shutil.rmtree(work / f"train-{args.pairs}", ignore_errors=True)
    train_cfg = config(work, model, data, f"train-{args.pairs}")
    result["train_start_warm"] = run(preftune("train", "--config", str(train_cfg), *train_args), env)
    for name in ("inspect_baseline", "inspect_cold", "inspect_warm", "train_baseline", "train_start_warm"):
        result[name].pop("stdout")
    for name, base in (
        ("inspect_cold", "inspect_baseline"),
        ("inspect_warm", "inspect_baseline"),
        ("train_start_warm", "train_baseline"),
    ):
        added = result[name]["peak_rss_mib"] - result[base]["peak_rss_mib"]
        result[name] |= {"added_mib": added, "added_over_token_store": round(added / store, 2)}
    if "trl" in result:
        trl, cold = result["trl"], result["inspect_cold"]
        result["inspect_cold_speedup_over_trl"] = {
            "wall": round(trl["wall_s"] / cold["wall_s"], 2),
            "cpu": round(trl["cpu_s"] / cold["cpu_s"], 2),
        }
    result["load_average_at_end"] = os.getloadavg()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
