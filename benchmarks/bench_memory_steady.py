"""Steady memory: resident memory of a 1,000-step demo run after step 100 and after step 1,000.

    .venv/bin/python benchmarks/bench_memory_steady.py                  # 1,000 steps, 8 pairs a step
    .venv/bin/python benchmarks/bench_memory_steady.py --steps 1000 --global-batch-size 32

The demo's model and data (``preftune demo``), with smaller steps so that 1,000 of them (two epochs) run in
minutes on a CPU; validation every 250 steps and a checkpoint every 250 (the newest two kept), so the
measured loop holds every part of a long run. A memory leak per step shows as growth between the two
readings; the issue asks for less than 5%. Prints JSON; not a timed test.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from preftune import recipe
from preftune.config_checks import load_config
from preftune.tools.demo import prepare_demo
from preftune.training.trainer import DPOTrainer

sys.path.insert(0, str(Path(__file__).parent))
from json_report import emit


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--early", type=int, default=100, help="the first reading, after this step")
    parser.add_argument("--global-batch-size", type=int, default=8)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (the demo model gains nothing from more)"
    )
    parser.add_argument("--output", help="also write the JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    readings: dict[int, float] = {}
    train_step = DPOTrainer.train_single_step

    def measured_step(self: DPOTrainer, global_batch: list[dict]) -> dict[str, Any]:
        metrics = train_step(self, global_batch)
        if self.step + 1 in (args.early, args.steps):  # self.step counts the step once this returns
            readings[self.step + 1] = rss_mib()
        return metrics

    DPOTrainer.train_single_step = measured_step
    with tempfile.TemporaryDirectory() as tmp:
        paths = prepare_demo(Path(tmp))
        cfg = load_config(
            paths["config"],
            [
                "trainer.max_epochs=null",
                f"trainer.max_steps={args.steps}",
                f"data.global_batch_size={args.global_batch_size}",
                f"data.micro_batch_size={args.global_batch_size}",
                "trainer.val_check_interval=250",
                "trainer.limit_val_batches=2",
                "trainer.save_interval=250",
                "trainer.keep_last=2",
                "trainer.log_every_n_steps=1",
            ],
        )
        start = time.monotonic()
        recipe.train(cfg)
        seconds = time.monotonic() - start
    early, late = readings[args.early], readings[args.steps]
    result = {
        "steps": args.steps,
        "global_batch_size": args.global_batch_size,
        "threads": args.threads,
        f"rss_mib_after_step_{args.early}": round(early, 1),
        f"rss_mib_after_step_{args.steps}": round(late, 1),
        "growth_percent": round(100 * (late - early) / early, 2),
        "seconds": round(seconds, 1),
    }
    emit(result, args.output)


if __name__ == "__main__":
    main()
