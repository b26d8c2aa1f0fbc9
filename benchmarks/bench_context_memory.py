"""Per-rank activation memory of context parallelism (CP=2, gloo, CPU) against one process, at 8k-token pairs.

    python benchmarks/bench_context_memory.py [--tokens 8192] [--layers 4] [--hidden 512]

One shared-prompt row per micro-batch: a pair of a prompt of half the tokens and two responses of a quarter
each (8,192 tokens laid out for the default). A Llama-style model (grouped-query attention, 8 heads, 2 key/value
heads, vocab 4,096) runs the forward and backward of DPO's per-sequence log-probs, once in a process alone
and once as each rank of a 2-process gloo group on the row split by ``split_for_context``. Each process is
fresh (spawned) and reports:

- ``saved_mib``: the activations autograd keeps for the backward, measured by a ``saved_tensors_hooks`` pack
  hook over the forward: every saved tensor's storage counted once, the parameters' excluded;
- ``peak_rss_mib``: the process's peak resident memory (``ru_maxrss``) over the forward and backward, less its
  resident memory just before the forward (weights, libraries): the activations plus the transient buffers.

Prints JSON: each run's figures (rank by rank for CP) and the ratios CP / one process of the larger rank.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import socket
import time

import torch
import torch.distributed as dist

from preftune.data.context_split import split_for_context
from preftune.data.packing import layout_rows
from preftune.modeling.logprobs import SequenceLogprobs
from preftune.tools.tiny import EOS_ID, build_tiny_model

VOCAB = 4096


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(args: argparse.Namespace, rank: int, size: int, port: int, out: mp.Queue) -> None:
    """One process's figures: the whole row (``size`` 1) or context rank ``rank`` of ``size``'s part."""
    torch.set_num_threads(1)
    if size > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    model = build_tiny_model("llama", VOCAB, hidden_size=args.hidden, num_layers=args.layers, num_heads=8,
                             num_key_value_heads=2, intermediate_size=4 * args.hidden,
                             max_position_embeddings=args.tokens)  # fmt: skip
    model.set_attn_implementation("preftune_varlen")
    runner = SequenceLogprobs(model)
    g = torch.Generator().manual_seed(0)
    prompt, response = args.tokens // 2, args.tokens // 4

    def tokens(n: int) -> list[int]:
        return torch.randint(3, VOCAB, (n,), generator=g).tolist()

    pair = {"prompt_ids": tokens(prompt), "chosen_ids": tokens(response), "rejected_ids": tokens(response),
            "chosen_reward": 1.0, "rejected_reward": 0.0, "index": 0}  # fmt: skip
    batch, _ = layout_rows([[pair]], eos_id=EOS_ID, share_prompt=True)
    batch = split_for_context(batch, rank, size, pad_id=EOS_ID)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    before = rss_mib()
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logps, _ = runner(batch)
    logps.sum().backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    out.put({"rank": rank, "tokens": int(batch.input_ids.numel()), "saved_mib": sum(saved.values()) / 2**20,
             "peak_rss_mib": peak - before, "seconds": seconds})  # fmt: skip
    if size > 1:
        dist.destroy_process_group()


def run(args: argparse.Namespace, size: int) -> list[dict]:
    """Each of ``size`` fresh processes' figures, by rank."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [context.Process(target=measure, args=(args, r, size, port, queue)) for r in range(size)]
    for p in procs:
        p.start()
    found = sorted((queue.get() for _ in procs), key=lambda f: f["rank"])
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"a measuring process failed (exit {p.exitcode})")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tokens", type=int, default=8192, help="the pair's tokens (prompt + both responses)"
    )
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    args = parser.parse_args()
    one, split = run(args, 1), run(args, 2)
    print(json.dumps({
        "setup": {"tokens": args.tokens, "layers": args.layers, "hidden": args.hidden, "vocab": VOCAB,
                  "heads": 8, "kv_heads": 2, "dtype": "float32", "device": "cpu", "threads": 1},
        "one_process": one[0],
        "context_parallel_2": split,
        "ratio_saved": max(f["saved_mib"] for f in split) / one[0]["saved_mib"],
        "ratio_peak_rss": max(f["peak_rss_mib"] for f in split) / one[0]["peak_rss_mib"],
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
