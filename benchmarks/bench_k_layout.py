"""Benchmark K-completion groups against the same pairs laid out pair by pair (packed, shared prompt,
``preftune_varlen``): online ``all_pairs`` over K completions of each prompt, policy forward + backward.

Pair by pair, a completion in several pairs is laid out (and run) once per pair; in a group, once. Both runs
are interleaved rep by rep in this process (so other load hits them alike); reported as the best of the reps.

    .venv/bin/python benchmarks/bench_k_layout.py [--k 4] [--prompts 16] [--reps 3]
"""

import argparse
import json
import random
import time

import torch

from preftune.data.packing import build_packed_collate, group_by_prompt
from preftune.modeling.logprobs import SequenceLogprobs
from preftune.tools.tiny import EOS_ID, build_tiny_model

BUDGET = 1024  # tokens per packed row


def all_pairs(k: int, prompts: int, seed: int = 0) -> list[dict]:
    """Every pair of differently rewarded completions: 48-token prompts, 32-64-token completions."""
    rng = random.Random(seed)
    pairs = []
    for p in range(prompts):
        prompt = [rng.randrange(3, 300) for _ in range(48)]
        completions = [[rng.randrange(3, 300) for _ in range(rng.randint(32, 64))] for _ in range(k)]
        rewards = [rng.random() for _ in range(k)]
        for a in range(k):
            for b in range(k):
                if rewards[a] > rewards[b]:
                    pairs.append({"prompt_ids": prompt, "chosen_ids": completions[a],
                                  "rejected_ids": completions[b], "chosen_reward": rewards[a],
                                  "rejected_reward": rewards[b], "index": len(pairs),
                                  "completion_keys": ((p, a), (p, b))})  # fmt: skip
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_tiny_model("llama", 300, hidden_size=128, num_layers=4, num_heads=4)
    model.set_attn_implementation("preftune_varlen")
    runner = SequenceLogprobs(model)
    collate = build_packed_collate(
        eos_id=EOS_ID, model_config=model.config, attn_implementation="preftune_varlen", pack=True,
        share_prompt=True, max_tokens_per_row=BUDGET,
    )  # fmt: skip
    pairs = all_pairs(args.k, args.prompts)
    layouts = {"pairs": collate(pairs), "groups": collate(group_by_prompt(pairs, BUDGET, share_prompt=True))}
    best = dict.fromkeys(layouts, float("inf"))
    for _ in range(args.reps):
        for name, batches in layouts.items():
            start = time.perf_counter()
            for batch in batches:
                runner(batch)[0].sum().backward()
            best[name] = min(best[name], time.perf_counter() - start)
    result = {
        "k": args.k,
        "pairs": len(pairs),
        **{f"{name}_tokens": sum(b.num_tokens for b in batches) for name, batches in layouts.items()},
        **{f"{name}_seconds": round(seconds, 3) for name, seconds in best.items()},
        "speedup": round(best["pairs"] / best["groups"], 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
