"""Peak memory of a LoRA run vs a full fine-tune of the same model, each `preftune train` in its own process.

    python benchmarks/bench_lora_memory.py [--output runs/bench/lora_memory.json]

Builds a Llama-style model (hidden 512, 8 layers, vocab 32,000: 64M parameters) and two small preference sets
locally (short: ~25-token prompts and responses; long: ~130), trains 3 steps of 8 pairs (micro-batches of 4)
each way, and prints JSON with each run's peak RSS (the child's ru_maxrss) and the ratios. LoRA removes the
weight-sized memory (reference copy, gradients, Adam state); activations are the same either way, so with long
sequences activation checkpointing is the lever, and it is measured too.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from preftune.tools.tiny import build_tiny_model, save_tiny, train_tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from json_report import emit

WORDS = "alpha beta gamma delta river stone cloud green quick slow bright dark north south east west".split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def peak_rss_of(cmd: list[str]) -> float:
    """Run ``cmd`` in a fresh process (via a tiny launcher) and return its peak RSS in MiB."""
    launcher = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, "
        "stderr=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", launcher, *cmd], capture_output=True, text=True, check=True)
    return int(out.stdout.strip()) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", type=Path)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = {}
        for name, words in (("short", 12), ("long", 60)):
            pairs = [
                {
                    "prompt": sentence(rng, words),
                    "chosen": sentence(rng, words),
                    "rejected": sentence(rng, words),
                }
                for _ in range(64)
            ]
            data[name] = root / f"{name}.jsonl"
            data[name].write_text("".join(json.dumps(p) + "\n" for p in pairs))
        tokenizer = train_tokenizer((sentence(rng, 60) for _ in range(200)), vocab_size=300)
        model = build_tiny_model("llama", 32_000, hidden_size=512, num_layers=8, num_heads=8)
        params = sum(p.numel() for p in model.parameters())
        save_tiny(model, tokenizer, root / "model")
        del model
        (root / "empty.yaml").write_text("{}\n")
        runs = {
            "full_finetune": (),
            "lora_r16": ("model.lora.r=16",),
            "lora_r16_activation_checkpointing": ("model.lora.r=16", "model.activation_checkpointing=true"),
        }
        peaks: dict[str, dict[str, int]] = {}
        for length, path in data.items():
            for run, extra in runs.items():
                cmd = [
                    sys.executable, "-m", "preftune", "train", "--config", str(root / "empty.yaml"),
                    f"model.path={root / 'model'}", f"data.train={path}", f"output_dir={root / length / run}",
                    "data.micro_batch_size=4", "data.global_batch_size=8", f"trainer.max_steps={args.steps}",
                    "data.max_seq_length=512", *extra,
                ]  # fmt: skip
                peaks.setdefault(length, {})[run] = round(peak_rss_of(cmd))
    result = {
        "model_parameters": params,
        "steps": args.steps,
        "peak_rss_mib": peaks,
        "over_full_finetune": {
            length: {run: round(mib / p["full_finetune"], 3) for run, mib in p.items()}
            for length, p in peaks.items()
        },
    }
    emit(result, args.output)


if __name__ == "__main__":
    main()
