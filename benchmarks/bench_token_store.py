"""Memory of tokenized pairs: preftune's ``TokenizedPairs`` (flat int32 columns) against Python lists.

    .venv/bin/python benchmarks/bench_token_store.py                # 100k pairs of 200 + 150 + 150 tokens
    .venv/bin/python benchmarks/bench_token_store.py --pairs 10000

Each layout is built in its own subprocess from the same seeded token stream (ids drawn from a 32k vocab, as
real tokenizers give: most ids above CPython's small-int cache); the resident memory it adds is measured.
Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

FIELDS = {"prompt_ids": 200, "chosen_ids": 150, "rejected_ids": 150}


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def pairs(n: int) -> Iterator[dict[str, Any]]:
    rng = random.Random(0)
    for _ in range(n):
        yield {name: [rng.randrange(300, 32_000) for _ in range(k)] for name, k in FIELDS.items()} | {
            "chosen_reward": 1.0,
            "rejected_reward": 0.0,
        }


def child(layout: str, n: int) -> dict[str, Any]:
    from preftune.data.dataset import TokenizedPairs

    base, start = rss_mib(), time.perf_counter()
    held = list(pairs(n)) if layout == "lists" else TokenizedPairs.from_examples(pairs(n))
    out = {"layout": layout, "pairs": len(held), "added_rss_mib": round(rss_mib() - base, 1)}
    out["build_s"] = round(time.perf_counter() - start, 1)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=100_000)
    p.add_argument("--child", choices=["lists", "store"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.pairs)))
        return
    runs = [
        json.loads(
            subprocess.run(
                [sys.executable, __file__, "--child", layout, "--pairs", str(args.pairs)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
        )
        for layout in ("lists", "store")
    ]
    tokens = args.pairs * sum(FIELDS.values())
    ratio = runs[1]["added_rss_mib"] / runs[0]["added_rss_mib"]
    print(json.dumps({"tokens": tokens, "runs": runs, "store_vs_lists_memory": round(ratio, 3)}, indent=2))


if __name__ == "__main__":
    main()
