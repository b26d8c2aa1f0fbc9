"""Benchmark `token_logprobs` (chunked) against the naive full-logits path, forward + backward.

Time: all implementations run in this process, interleaved rep by rep, so other load on the
machine hits them alike; reported as the median time and the median of the per-rep ratios to
naive. Peak memory: each (V, implementation) runs in its own subprocess, measured as the peak-RSS
delta over one step (VmHWM reset via /proc/self/clear_refs) on CPU, `torch.cuda.max_memory_allocated`
on CUDA, above the inputs and their grads. Prints JSON; `--output` also writes it.

    .venv/bin/python benchmarks/bench_logprobs.py [--device cuda] [--output runs/bench/bench_logprobs.json]
"""

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from preftune.modeling.logprobs import token_logprobs

sys.path.insert(0, str(Path(__file__).parent))
from json_report import emit


def naive_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The full-logits reference: log_softmax over [N, V] fp32 logits, then the label gather."""
    return F.log_softmax((hidden @ weight.T).float(), dim=-1).gather(1, labels[:, None]).squeeze(1)


def make_step(n: int, h: int, v: int, chunk: int, device: str, dtype: torch.dtype) -> Callable[[], None]:
    """One fwd+bwd of a case (chunk 0: naive) on fixed random inputs, synchronized."""
    torch.manual_seed(0)
    hidden = torch.randn(n, h, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(v, h, device=device, dtype=dtype) * h**-0.5).requires_grad_()
    labels = torch.randint(0, v, (n,), device=device)
    grad_out = torch.randn(n, device=device)

    def step() -> None:
        hidden.grad = weight.grad = None
        if chunk:
            logp = token_logprobs(hidden, weight, labels, chunk_size=chunk)
        else:
            logp = naive_logprobs(hidden, weight, labels)
        logp.backward(grad_out)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    return step


def _proc_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_mib(n: int, h: int, v: int, chunk: int, device: str, dtype: torch.dtype) -> float:
    """Transient peak memory (MiB) of one fwd+bwd, after a warm-up that allocates the grads."""
    step = make_step(n, h, v, chunk, device, dtype)
    step()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base = _proc_kib("VmRSS")
    step()
    return (_proc_kib("VmHWM") - base) / 2**10


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2048, help="tokens")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, nargs="+", default=[4096, 32000])
    p.add_argument("--chunks", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--reps", type=int, default=5, help="timed fwd+bwd per implementation")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--output", type=Path)
    p.add_argument("--peak-of", type=int, nargs=2, metavar=("V", "CHUNK"), help=argparse.SUPPRESS)
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peak_of:  # worker: peak memory of one case, on stdout
        print(peak_mib(args.n, args.hidden, *args.peak_of, args.device, dtype))
        return

    rows = []
    impls = [0, *args.chunks]  # chunk 0: naive
    for v in args.vocab:
        steps = {c: make_step(args.n, args.hidden, v, c, args.device, dtype) for c in impls}
        times: dict[int, list[float]] = {c: [] for c in impls}
        for rep in range(args.reps + 1):
            for c in impls:
                t0 = time.perf_counter()
                steps[c]()
                if rep:  # rep 0 is the warm-up
                    times[c].append(time.perf_counter() - t0)
        for c in impls:
            cmd = [sys.executable, __file__, "--peak-of", str(v), str(c), "--n", str(args.n)]
            cmd += ["--hidden", str(args.hidden), "--device", args.device, "--dtype", args.dtype]
            peak = float(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()[-1])
            rows.append(
                {
                    "n": args.n,
                    "hidden": args.hidden,
                    "vocab": v,
                    "impl": "chunked" if c else "naive",
                    "chunk_size": c or None,
                    "time_s": round(statistics.median(times[c]), 4),
                    "time_ratio": round(
                        statistics.median(a / b for a, b in zip(times[c], times[0], strict=True)), 3
                    ),
                    "peak_mib": round(peak, 1),
                }
            )
        naive_peak = rows[-len(impls)]["peak_mib"]
        for row in rows[-len(impls) :]:
            row["mem_ratio"] = round(row["peak_mib"] / naive_peak, 3)
    report = {
        "device": args.device,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "reps": args.reps,
        "note": "time_s: median fwd+bwd; time_ratio: median per-rep ratio to naive (interleaved reps); "
        "peak_mib: transient peak above inputs and grads; mem_ratio: to naive",
        "cases": rows,
    }
    emit(report, args.output)


if __name__ == "__main__":
    main()
