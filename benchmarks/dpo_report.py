"""The benchmark's report: the machine and its matmul peak, each run's medians and MFU, the comparison with
TRL, and the table printed at the end."""

from __future__ import annotations

import contextlib
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from dpo_workload import PAIRS_PER_STEP


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    import torch
    import transformers

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "platform": platform.platform(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
    try:
        import trl

        info["trl"] = trl.__version__
    except ImportError:
        info["trl"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    with contextlib.suppress(ValueError, OSError):
        info["mem_total_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    return info


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def matmul_peak(dtype_name: str, *, seconds: float = 3.0, max_reps: int = 30) -> dict[str, Any]:
    """GFLOP/s of square matmuls on all threads: best and median of the timed repetitions."""
    import torch

    dtype = getattr(torch, dtype_name)
    cuda = torch.cuda.is_available()
    n = 8192 if cuda else 2048
    device = "cuda" if cuda else "cpu"
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    flops = 2 * n**3

    def once() -> float:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.mm(a, b)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for _ in range(2):
        once()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (len(times) < max_reps and time.perf_counter() - start < seconds):
        times.append(once())
    return {
        "dtype": dtype_name,
        "n": n,
        "reps": len(times),
        "best_gflops": round(flops / min(times) / 1e9, 1),
        "median_gflops": round(flops / statistics.median(times) / 1e9, 1),
    }


def summarize(
    result: dict[str, Any], work: list[dict], warmup: int, performed: str = "flops"
) -> dict[str, Any]:
    """Medians over the counted steps (the steps after the warm-up); ``performed``: the ``work`` key of the
    FLOPs the run performs (strict MFU)."""
    times = result["step_times"]
    counted = list(range(warmup, min(len(times), len(work))))
    if not counted:
        return {"error": f"only {len(times)} steps ran, {warmup} of them warm-up"}
    med = statistics.median(times[i] for i in counted)
    warm = times[:warmup]
    out: dict[str, Any] = {
        "s_per_step": round(med, 4),
        "pairs_per_s": round(PAIRS_PER_STEP / med, 3),
        "tokens_per_s": round(statistics.median(work[i]["tokens"] / times[i] for i in counted), 1),
        "flops_per_s": round(statistics.median(work[i]["flops"] / times[i] for i in counted)),
        "performed_flops_per_s": round(statistics.median(work[i][performed] / times[i] for i in counted)),
        "counted_steps": len(counted),
        "step_times": [round(t, 4) for t in times],
        "warmup_overhead_s": round(sum(warm) - len(warm) * med, 2) if warm else None,
    }
    tokens = result.get("trainer_tokens") or []
    out["trainer_counted_tokens"] = tokens
    out["tokens_match_trainer"] = (
        all(a == b["tokens"] for a, b in zip(tokens, work, strict=False)) if tokens else None
    )
    return out


def add_mfu(run: dict[str, Any], peaks: dict[str, float]) -> None:
    """MFU of a summarized run against the peak (GFLOP/s) of its compute dtype (bf16 for bf16_autocast)."""
    dtype = "bfloat16" if run["mode"] == "bf16_autocast" else "float32"
    run["peak_dtype"] = dtype
    run["mfu"] = round(run["flops_per_s"] / (peaks[dtype] * 1e9), 4)
    run["mfu_strict"] = round(run["performed_flops_per_s"] / (peaks[dtype] * 1e9), 4)
    run["mfu_vs_fp32_peak"] = round(run["flops_per_s"] / (peaks["float32"] * 1e9), 4)


def fmt(x: Any, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def print_table(runs: list[dict[str, Any]]) -> None:
    header = (
        "model", "run", "pairs/s", "tokens/s", "s/step", "peak MiB", "MFU", "strict MFU", "xTRL pairs/s", "xTRL mem"
    )  # fmt: skip
    rows = []
    for r in runs:
        name = "trl" if r["trainer"] == "trl" else r["mode"]
        if r.get("error") or r.get("skipped"):
            rows.append((r["model"], name, r.get("skipped") or r["error"], *[""] * (len(header) - 3)))
            continue
        rows.append(
            (
                r["model"],
                name,
                fmt(r.get("pairs_per_s"), ".2f"),
                fmt(r.get("tokens_per_s"), ".0f"),
                fmt(r.get("s_per_step"), ".3f"),
                fmt(r.get("peak_mib"), ".0f"),
                fmt(100 * r["mfu"], ".1f") + "%" if r.get("mfu") is not None else "-",
                fmt(100 * r["mfu_strict"], ".1f") + "%" if r.get("mfu_strict") is not None else "-",
                fmt(r.get("x_trl_pairs_per_s"), ".2f"),
                fmt(r.get("x_trl_memory"), ".2f"),
            )
        )
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print(
            "  ".join(
                str(c).ljust(w) if i < 2 else str(c).rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )


def compare_to_trl(model_runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Add each preftune run's ratios to the model's TRL run (``x_trl_*``); return the step-1 check: the
    loss and mean chosen log-prob of TRL's first step against preftune's padded run (else the first
    preftune run with an online reference)."""
    trl_run = next((r for r in model_runs if r["trainer"] == "trl" and "s_per_step" in r), None)
    for r in model_runs:
        if trl_run is not None and "s_per_step" in r and r is not trl_run:
            r["x_trl_pairs_per_s"] = round(r["pairs_per_s"] / trl_run["pairs_per_s"], 3)
            r["x_trl_memory"] = round(r["peak_mib"] / trl_run["peak_mib"], 3)
    candidates = [r for r in model_runs if r["trainer"] == "preftune" and "step1" in r]
    padded = next(
        (r for r in candidates if r["mode"] == "padded"),
        next((r for r in candidates if r["mode"] != "precompute"), candidates[0] if candidates else None),
    )
    check: dict[str, Any] = {"log2": round(math.log(2), 6)}
    if padded is not None:
        check["preftune_mode"] = padded["mode"]
        check["preftune_step1_loss"] = padded["step1"]["loss"]
        check["preftune_step1_logps_chosen_mean"] = padded["step1"]["logps_chosen_mean"]
    if trl_run is not None:
        check["trl_step1_loss"] = trl_run["step1"]["loss"]
        check["trl_step1_logps_chosen_mean"] = trl_run["step1"]["logps_chosen_mean"]
    if padded is not None and trl_run is not None:
        a, b = padded["step1"]["loss"], trl_run["step1"]["loss"]
        check["loss_abs_diff"] = abs(a - b) if a is not None and b is not None else None
        a, b = padded["step1"]["logps_chosen_mean"], trl_run["step1"]["logps_chosen_mean"]
        check["logps_chosen_rel_diff"] = abs(a - b) / abs(b) if a is not None and b else None
    return check


def run_line(run: dict[str, Any]) -> str:
    """One finished run in a line (or why it failed, with its log's tail)."""
    if run.get("error"):
        return "\n".join([f"failed: {run['error']}", *(f"| {line}" for line in run.get("log_tail", []))])
    extra = f", precompute {run['precompute_s']:.1f} s" if run.get("precompute_s") else ""
    extra += f", compile {run['compile_s']:.1f} s" if run.get("compile_s") is not None else ""
    return (
        f"{run['s_per_step']:.3f} s/step, {run['pairs_per_s']:.2f} pairs/s, "
        f"peak {run['peak_mib']:.0f} MiB, {run['performed_flops_per_s'] / 1e9:.0f} GFLOP/s performed, "
        f"step-1 loss {run['step1']['loss']}{extra} ({run['process_s']:.0f} s)"
    )


def finish(report: dict[str, Any], peak_samples: dict[str, list[dict[str, Any]]], started: float) -> None:
    """Measure the peaks a last time, add every run's MFU against the best, close the report."""
    for d in peak_samples:
        peak_samples[d].append(matmul_peak(d))
    peaks = {d: max(x["best_gflops"] for x in v) for d, v in peak_samples.items()}
    report["peak_gflops"] = peaks
    for r in report["runs"]:
        if "performed_flops_per_s" in r:
            add_mfu(r, peaks)
    report["machine"]["load_average_end"] = load_average()
    report["total_s"] = round(time.time() - started, 1)
    report["note"] = (
        "s_per_step: median over counted steps; pairs_per_s = 8 / s_per_step; tokens_per_s, mfu: medians of "
        "per-step values; peak_mib: peak RSS (CUDA: max allocated) of the run's process through its last step; "
        "x_trl_*: ratio to the TRL run on the same model (pairs/s: higher is better; memory: lower is better); "
        "mfu is against the matmul peak of the run's compute dtype (bf16 for bf16_autocast)"
    )


def print_summary(report: dict[str, Any]) -> None:
    """The table, the step-1 losses and the peaks."""
    print()
    print_table(report["runs"])
    for name, check in report["step0_check"].items():
        print(
            f"step-1 loss ({name}): preftune {check.get('preftune_step1_loss')}, "
            f"TRL {check.get('trl_step1_loss')} (log 2 = {check['log2']})"
        )
    peaks = report["peak_gflops"]
    print(
        f"matmul peak (best of {len(report['peaks']['float32'])} measurements): fp32 {peaks['float32']} "
        f"GFLOP/s, bf16 {peaks['bfloat16']} GFLOP/s; total {report['total_s']:.0f} s"
    )
