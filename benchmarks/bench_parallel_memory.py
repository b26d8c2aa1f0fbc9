"""Per-rank memory of tensor and context parallelism against one process, on CPU with gloo, through the real
``preftune train`` (one optimizer step of one micro-batch), each layout a launch of its own.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_parallel_memory.py --output runs/bench/parallel_memory.json

Two workloads, each run on 1 process and on 2 (``torchrun``, ``distributed.strategy=fsdp2``):
- ``tensor``: a Llama of 12 layers (hidden 1024, 16 heads, 8 key-value heads, MLP 2816, vocabulary 32,000;
  ~190M parameters, fp32) on short pairs, 1 process against ``distributed.tensor_parallel=2``. What counts is
  the memory a rank holds for training: the policy's parameters, their gradients and AdamW's two moments
  (the frozen reference copy is reported beside it).
- ``context``: a small Llama (4 layers, hidden 512, MLP 1408, vocabulary 32,000) on 8,192-token pairs (2,048 prompt + 3,072 + 3,072
  response tokens, ``data.share_prompt=true``: one row of 8,192 tokens), 1 process against
  ``distributed.context_parallel=2``. What counts is the activation memory: the bytes autograd saves for
  the backward pass.

How each figure is measured, per rank, in the step (``DPOTrainer.train_single_step`` wrapped):
- ``training_state_bytes``: the local bytes of the policy's parameters, gradients and optimizer state after
  the step (a DTensor counts its local shard only).
- ``reference_bytes``: the local bytes of the frozen reference's parameters.
- ``activation_bytes``: the bytes of every tensor ``torch.autograd.graph.saved_tensors_hooks`` sees saved for
  backward, parameters and views of them excluded, each storage counted once.
- ``step_peak_rss_bytes``: the peak resident memory during the step (``VmHWM``, reset by
  ``/proc/self/clear_refs`` just before it) less the resident memory at its start: what the step's forward,
  backward and optimizer update add, activations and transient buffers included.
- ``peak_rss_bytes``: the process's peak resident memory over the whole run (``ru_maxrss``) less its resident
  memory before the model was built: loading, the step and the checkpoint save (rank 0 gathers the full
  weights to write ``model/``), allocator slack and the gloo buffers included.
Prints (and writes) JSON: each layout's per-rank figures (the largest rank; every rank's peak RSS beside them)
and the ratios 2-rank / 1-process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from json_report import emit

WORKLOADS = {
    "tensor": {
        "model": dict(hidden_size=1024, num_layers=12, num_heads=16, intermediate_size=2816),
        "lengths": (48, 32, 32),  # prompt, chosen, rejected tokens
        "parallel": "distributed.tensor_parallel=2",
        "layout": [],
        "measure": "training_state_bytes",
    },
    "context": {
        "model": dict(hidden_size=512, num_layers=4, num_heads=8, intermediate_size=1408),
        "lengths": (2048, 3072, 3072),
        "parallel": "distributed.context_parallel=2",
        "layout": ["data.share_prompt=true", "data.pack_length=10240"],
        "measure": "activation_bytes",
    },
}
VOCAB = 32_000


def rss_bytes() -> int:
    """The resident memory now (Linux ``/proc/self/statm``)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def reset_high_water_mark() -> None:
    """Start ``/proc/self/status``'s VmHWM (peak resident memory) again from the resident memory now."""
    Path("/proc/self/clear_refs").write_text("5")


def high_water_mark_bytes() -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024  # kB


def local_bytes(tensors) -> int:
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        t = t.to_local() if isinstance(t, DTensor) else t
        total += t.numel() * t.element_size()
    return total


class SavedBytes:
    """Sums the bytes autograd saves for backward (parameters and their views excluded, each storage once)."""

    def __init__(self) -> None:
        self.total, self.seen = 0, set()

    def pack(self, tensor):
        import torch
        from torch.distributed.tensor import DTensor

        base = tensor._base if tensor._base is not None else tensor
        if not (isinstance(base, torch.nn.Parameter) or (base.is_leaf and base.requires_grad)):
            from torch.distributed._functional_collectives import AsyncCollectiveTensor

            local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
            if isinstance(local, AsyncCollectiveTensor):  # a TP layer's output, its all-reduce in flight
                local = local.wait()
            storage = local.untyped_storage()
            if storage.data_ptr() not in self.seen:
                self.seen.add(storage.data_ptr())
                self.total += storage.nbytes()
        return tensor

    @staticmethod
    def unpack(tensor):
        return tensor


def worker(args: argparse.Namespace) -> None:
    """One rank of one layout: train one step through the recipe, write this rank's figures."""
    import torch

    from preftune.config_checks import load_config
    from preftune.recipe import train
    from preftune.training.distributed import shutdown
    from preftune.training.trainer import DPOTrainer

    torch.set_num_threads(1)
    before = rss_bytes()
    figures: dict[str, int] = {}
    original = DPOTrainer.train_single_step

    def measured(self, *a, **k):
        saved = SavedBytes()
        reset_high_water_mark()
        start = rss_bytes()
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
            out = original(self, *a, **k)
        step_peak = high_water_mark_bytes() - start
        policy = [p for p in self.model.policy.parameters()]
        state = [
            v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()
        ]
        grads = [p.grad for p in policy if p.grad is not None]
        reference = getattr(self.model.reference, "runner", None)
        figures.update(
            training_state_bytes=local_bytes(policy) + local_bytes(grads) + local_bytes(state),
            reference_bytes=local_bytes(reference.parameters()) if reference is not None else 0,
            activation_bytes=saved.total,
            step_peak_rss_bytes=step_peak,
        )
        return out

    DPOTrainer.train_single_step = measured
    train(load_config(None, json.loads(args.worker)))
    figures["peak_rss_bytes"] = peak_rss_bytes() - before
    rank = int(os.environ.get("RANK", 0))
    Path(args.figures).with_suffix(f".rank{rank}.json").write_text(json.dumps(figures))
    shutdown()


def build(work: Path, name: str) -> tuple[Path, Path]:
    """The workload's model (saved with the tiny tokenizer, its vocabulary padded to ``VOCAB``) and one pair file."""
    import random

    from preftune.tools.tiny import build_tiny_model, save_tiny, train_tokenizer

    spec = WORKLOADS[name]
    tokenizer = train_tokenizer(["a b c d e f g h"] * 10, vocab_size=64)
    model = build_tiny_model(
        "llama", VOCAB, max_position_embeddings=max(1024, 2 * sum(spec["lengths"])), **spec["model"]
    )
    save_tiny(model, tokenizer, work / f"{name}-model")
    rng = random.Random(0)
    p, c, r = spec["lengths"]
    pair = {
        "prompt_ids": [rng.randrange(3, VOCAB) for _ in range(p)],
        "chosen_ids": [rng.randrange(3, VOCAB) for _ in range(c)],
        "rejected_ids": [rng.randrange(3, VOCAB) for _ in range(r)],
    }
    data = work / f"{name}-pairs.jsonl"
    data.write_text("".join(json.dumps(pair) + "\n" for _ in range(4)))
    return work / f"{name}-model", data


def run_layout(work: Path, name: str, nproc: int) -> dict[str, int]:
    """Launch one layout; the figures of its largest rank (by the workload's measure)."""
    spec = WORKLOADS[name]
    model, data = (
        build(work, name)
        if not (work / f"{name}-model").exists()
        else (
            work / f"{name}-model",
            work / f"{name}-pairs.jsonl",
        )
    )
    p, c, r = spec["lengths"]
    out = work / f"{name}-{nproc}"
    overrides = [
        f"model.path={model}",
        f"data.train={data}",
        f"output_dir={out}",
        f"data.max_seq_length={p + max(c, r)}",
        "data.micro_batch_size=1",
        "data.global_batch_size=1",
        "trainer.max_steps=1",
        "trainer.val_check_interval=100",
        "distributed.strategy=fsdp2",
        *spec["layout"],
        *([spec["parallel"]] if nproc > 1 else []),
    ]
    figures = work / f"{name}-{nproc}.json"
    script = [str(Path(__file__).resolve()), "--worker", json.dumps(overrides), "--figures", str(figures)]
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-port=29517"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*launcher, *script], capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(
            f"{name} on {nproc}: exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        )
    ranks = [json.loads(f.read_text()) for f in sorted(work.glob(f"{name}-{nproc}.rank*.json"))]
    largest = max(ranks, key=lambda f: f[spec["measure"]])
    return {**largest, "peak_rss_bytes_by_rank": [f["peak_rss_bytes"] for f in ranks]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/bench/parallel_memory"))
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--figures", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    args.work.mkdir(parents=True, exist_ok=True)
    result = {}
    for name in args.workloads:
        one, two = run_layout(args.work, name, 1), run_layout(args.work, name, 2)
        measure = WORKLOADS[name]["measure"]
        result[name] = {
            "one_process": one,
            "two_ranks": two,
            "setting": WORKLOADS[name]["parallel"],
            "measure": measure,
            "ratio": round(two[measure] / one[measure], 3),
            "step_peak_rss_ratio": round(two["step_peak_rss_bytes"] / one["step_peak_rss_bytes"], 3),
            "peak_rss_ratio": round(two["peak_rss_bytes"] / one["peak_rss_bytes"], 3),
        }
    emit(result, args.output)


if __name__ == "__main__":
    main()
