"""Benchmark `token_logprobs` (chunked) against the naive full-logits path, forward + backward.

Each (N, V, impl) case runs in its own subprocess so its peak memory can be measured in isolation:
on CPU the peak-RSS delta over the timed runs (VmHWM reset via /proc/self/clear_refs), on CUDA
`torch.cuda.max_memory_allocated` above the inputs. Prints JSON; `--output` also writes it.

    .venv/bin/python benchmarks/bench_logprobs.py [--device cuda] [--output runs/bench/bench_logprobs.json]
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from preftune.logprobs import token_logprobs


def naive_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The full-logits reference: log_softmax over [N, V] fp32 logits, then the label gather."""
    return F.log_softmax((hidden @ weight.T).float(), dim=-1).gather(1, labels[:, None]).squeeze(1)


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_case(n: int, h: int, v: int, chunk: int, reps: int, device: str, dtype: str) -> dict:
    """Fwd+bwd times of one case (chunk 0: naive) in this process, and its peak memory in MiB above inputs+grads."""
    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    hidden = torch.randn(n, h, device=device, dtype=dt, requires_grad=True)
    weight = (torch.randn(v, h, device=device, dtype=dt) * h**-0.5).requires_grad_()
    labels = torch.randint(0, v, (n,), device=device)
    grad_out = torch.randn(n, device=device)
    cuda = device.startswith("cuda")

    def step() -> None:
        hidden.grad = weight.grad = None
        logp = (
            naive_logprobs(hidden, weight, labels)
            if chunk == 0
            else token_logprobs(hidden, weight, labels, chunk_size=chunk)
        )
        logp.backward(grad_out)
        if cuda:
            torch.cuda.synchronize()

    step()  # warm-up; grads now allocated, so the peak below is the transient memory only
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        base = _rss_kib("VmRSS") * 1024
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if cuda else _rss_kib("VmHWM") * 1024
    return {"times_s": times, "peak_mib": (peak - base) / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2048, help="tokens")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, nargs="+", default=[4096, 32000])
    p.add_argument("--chunks", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--reps", type=int, default=3, help="timed fwd+bwd per subprocess")
    p.add_argument("--rounds", type=int, default=3, help="subprocesses per case, interleaved with the others")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--output", type=Path)
    p.add_argument("--case", type=int, nargs=3, metavar=("N", "V", "CHUNK"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:  # worker: one case, result as JSON on stdout
        n, v, chunk = args.case
        print(json.dumps(run_case(n, args.hidden, v, chunk, args.reps, args.device, args.dtype)))
        return

    cases = [(v, chunk) for v in args.vocab for chunk in [0, *args.chunks]]  # chunk 0: naive
    times: dict[tuple[int, int], list[float]] = {c: [] for c in cases}
    peaks: dict[tuple[int, int], list[float]] = {c: [] for c in cases}
    for _ in range(args.rounds):
        for v, chunk in cases:
            cmd = [
                sys.executable,
                __file__,
                "--case",
                str(args.n),
                str(v),
                str(chunk),
                "--hidden",
                str(args.hidden),
            ]
            cmd += ["--reps", str(args.reps), "--device", args.device, "--dtype", args.dtype]
            r = json.loads(
                subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]
            )
            times[v, chunk] += r["times_s"]
            peaks[v, chunk].append(r["peak_mib"])
    rows = []
    for v, chunk in cases:
        t, t0 = statistics.median(times[v, chunk]), statistics.median(times[v, 0])
        b, b0 = min(times[v, chunk]), min(times[v, 0])
        m, m0 = max(peaks[v, chunk]), max(peaks[v, 0])
        rows.append(
            {
                "n": args.n,
                "hidden": args.hidden,
                "vocab": v,
                "impl": "chunked" if chunk else "naive",
                "chunk_size": chunk or None,
                "time_s": round(t, 4),
                "peak_mib": round(m, 1),
                "time_min_s": round(b, 4),
                "time_ratio": round(t / t0, 3),
                "time_min_ratio": round(b / b0, 3),
                "mem_ratio": round(m / m0, 3) if m0 > 0 else None,
            }
        )
    report = {
        "device": args.device,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "note": "time_s / time_min_s: median / best fwd+bwd (best is robust to other load on the machine); "
        "peak_mib: max transient peak above inputs+grads; ratios vs naive",
        "cases": rows,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
