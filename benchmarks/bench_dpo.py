"""Throughput and memory of preftune's DPO training modes against TRL's ``DPOTrainer``.

    .venv/bin/python benchmarks/bench_dpo.py --output runs/bench/bench_dpo.json          # the full run
    .venv/bin/python benchmarks/bench_dpo.py --models small --modes padded --steps 2     # a quick check

Everything is built locally (``preftune.tools.tiny``): Llama-style random-init models (hidden 256, 4 layers, 4
heads / 2 KV heads, MLP 720; "small": vocab 4,096, 5.1M parameters; "bigvocab": vocab 128,256 as Llama 3,
68.7M), a byte-level BPE trained on the generated text, and synthetic preference pairs (prompts 40-200
words, responses 20-200 words, fixed seed) in TRL's standard format (``prompt``/``chosen``/``rejected``),
read by both trainers from the same JSONL file. The code: ``dpo_workload`` (models, pairs, modes, tokens and
FLOPs per step), ``dpo_runners`` (one process per trainer/mode), ``dpo_report`` (medians, MFU, the table).

Identical work for every run: fp32 weights, 8 pairs per optimizer step in one micro-batch (no gradient
accumulation), beta 0.1, AdamW lr 1e-6 (betas 0.9/0.98, non-fused), grad clip 1.0, no gradient
checkpointing (except the ``activation_checkpointing`` mode), a separate frozen reference model run every
step (except ``precompute``), max length 1024 (prompt + response; nothing is truncated), sdpa attention
(packed and shared-prompt modes: preftune's default there, ``preftune_varlen``; ``packed_masks``: sdpa).
TRL reads the pairs sequentially in the order preftune's sampler draws them (same seed), so step k of every
run trains on the same 8 pairs. Each trainer/mode runs in its own subprocess (``dpo_runners.py``
given a spec file), so peak memory is isolated.

Timing: the trainers' own per-step times, a full optimizer step (policy forward + backward over chosen and
rejected, the reference forward, clipping, AdamW, scheduler): preftune's ``train/step_time`` from
``metrics.jsonl`` (includes padding the micro-batch); TRL: a ``TrainerCallback`` from ``on_step_begin`` to
``on_step_end`` (the batch is collated before ``on_step_begin``). The first ``--warmup`` steps are not
counted; s/step is the median over the counted steps, pairs/s = 8 / s/step, tokens/s and MFU are medians of
the per-step values. ``precompute``: the one-off reference pass over the data set is reported separately
(``precompute_s``); ``compile``: the warm-up overhead (sum of the warm-up steps minus as many median steps)
is reported as ``compile_s`` (cold: the inductor cache is a fresh directory per run).

Memory: peak RSS of the child process (``VmHWM``) through the end of its last training step: model loading,
tokenization and (``precompute``) the reference pass included; ``train_peak_rss_mib`` is the peak during the
training steps alone (``VmHWM`` reset before step 1). On CUDA: ``torch.cuda.max_memory_allocated``.

Tokens: real tokens = the standard DPO workload, for every pair len(prompt + chosen) + len(prompt +
rejected) (the prompt counted twice, no padding), the same number for every mode and for TRL.

FLOPs (useful work, the standard DPO workload, identical for every mode and for TRL: a mode that skips work,
such as the precomputed reference, is still credited with it, so its MFU is an effective MFU). Per sequence
(prompt + one response) of T = P + R tokens, R of them response tokens (EOS included):

    F_seq = 8 * (N_body * T + N_head * R + L * D * T**2)

    = policy forward + backward (6 FLOPs per parameter per token, 3x the forward's attention)
    + reference forward (2 FLOPs per parameter per token, 1x the forward's attention), where
    N_body = the weight matrices of the transformer blocks (q, k, v, o, gate, up, down; no embeddings, norms
             are negligible), run on all T tokens;
    N_head = vocab x hidden, the lm-head, counted only on the R positions that predict a response token
             (the only log-probs DPO needs);
    L * D * T**2 = causal attention forward over L layers, D = heads x head dim: QK^T and AV at 2 FLOPs per
             multiply-add over the T**2 / 2 causal (query, key) pairs each, 2 * L * D * T**2 for a forward.

A step's FLOPs are the sum over its 16 sequences; MFU = (FLOPs of the step / step time) / peak.

Strict MFU (``mfu_strict``) counts only the useful work a run performs: a shared prompt runs the prompt once (each
pair: P + C + R tokens; attention over (P + C)**2 / 2 causal pairs for prompt and chosen, and R * P + R**2 / 2
for rejected, which sees the prompt and itself), and a precomputed reference takes the reference forward out
of the step; padding, attention to masked-out keys (``packed_masks`` computes whole rows), activation
recomputation and the chunked lm-head's recomputation are never counted.
For runs that skip nothing it equals MFU.

Peak: this machine's matmul throughput measured in the same run with torch (square matmuls, 2048 on CPU,
8192 on CUDA, all threads; the best repetition): fp32 for every run, bf16 for ``bf16_autocast``
(``mfu_vs_fp32_peak`` is also recorded for it). A shared host's speed drifts by 20% over minutes, so fp32 is
measured at the start, before every run and at the end, and MFU divides by the best of all measurements.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from dpo_report import (
    compare_to_trl,
    finish,
    load_average,
    machine_info,
    matmul_peak,
    print_summary,
    run_line,
    summarize,
)
from dpo_runners import run_child, trl_args
from dpo_workload import (
    BETA,
    DATA_SEED,
    DEFAULT_MODES,
    LR,
    MAX_LENGTH,
    MODELS,
    MODES,
    PAIRS_PER_STEP,
    Workload,
    available_modes,
    build_workload,
    performed_flops_key,
)

FLOPS_DEFINITION = (
    "F_seq = 8 * (N_body*T + N_head*R + L*D*T^2) per sequence (prompt + one response; T tokens, R of them "
    "response tokens incl. EOS): policy forward+backward (6 FLOPs/param/token, 3x the causal attention "
    "forward 2*L*D*T^2) + reference forward (2 FLOPs/param/token, 1x); N_body = weight matrices of the "
    "blocks, N_head = vocab*hidden on the R response-predicting positions only, D = heads*head_dim. Same "
    "workload for every mode and for TRL (a precomputed reference is still credited)."
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--modes", nargs="+", choices=list(MODES), help="preftune modes (default: per model)")
    p.add_argument("--steps", type=int, help="counted steps (default: small 5, bigvocab 2)")
    p.add_argument("--warmup", type=int, help="warm-up steps, not counted (default: small 2, bigvocab 1)")
    p.add_argument("--trl", action=argparse.BooleanOptionalAction, default=True, help="also run TRL")
    p.add_argument("--output", type=Path, help="write the JSON report here")
    p.add_argument("--workdir", type=Path, help="models, data and runs (default: a temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic text")
    return p.parse_args()


def log(message: str) -> None:
    print(f"[bench_dpo] {message}", flush=True)


def trl_installed() -> bool:
    try:
        import trl  # noqa: F401
    except ImportError:
        log("trl is not installed (pip install -e '.[bench]'): TRL runs skipped")
        return False
    return True


def new_report(
    args: argparse.Namespace, peak_samples: dict[str, list[dict[str, Any]]], load_start: list[float] | None
) -> dict[str, Any]:
    """The report's frame: the machine, the settings every run shares; the runs are added as they finish."""
    return {
        "machine": {**machine_info(), "load_average_start": load_start},
        "peaks": peak_samples,
        "settings": {
            "pairs_per_step": PAIRS_PER_STEP,
            "micro_batch_pairs": PAIRS_PER_STEP,
            "gradient_accumulation": 1,
            "beta": BETA,
            "lr": LR,
            "max_length": MAX_LENGTH,
            "dtype": "float32",
            "attention": "sdpa",
            "reference": "separate frozen copy, run every step (precompute: one pass before training)",
            "data_seed": DATA_SEED,
            "text_seed": args.seed,
            "preftune_modes": {m: MODES[m] for m in MODES},
            "trl_args": None,
        },
        "flops_definition": FLOPS_DEFINITION,
        "models": {},
        "runs": [],
        "step0_check": {},
    }


def run_one(
    workload: Workload, name: str, trainer: str, mode: str, run_dir: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """One trainer/mode on one model, in its own process, summarized over the counted steps."""
    spec = {
        "model": name,
        "model_dir": str(workload.model_dir),
        "data_path": str(workload.data_path),
        "total_steps": len(workload.batches),
        "batches": workload.batches,
        "trainer": trainer,
        "mode": mode,
        "overrides": MODES.get(mode, []),
    }
    if trainer == "trl":
        spec["trl_args"] = trl_args(len(workload.batches))
    run: dict[str, Any] = {"model": name, "trainer": trainer, "mode": mode}
    run.update(run_child(spec, run_dir, args.timeout))
    if not args.keep:
        for sub in ("preftune", "trl", "inductor"):
            shutil.rmtree(run_dir / sub, ignore_errors=True)
    if "error" not in run:
        summary = summarize(
            run, workload.work, workload.info["warmup_steps"], performed_flops_key(spec["overrides"])
        )
        run.update(summary)
        if mode == "compile":
            run["compile_s"] = summary.get("warmup_overhead_s")
    return run


def bench_model(name: str, args: argparse.Namespace, report: dict[str, Any], with_trl: bool) -> None:
    """Build ``name``'s workload, run TRL and the preftune modes on it, add them to ``report``."""
    defaults = MODELS[name]
    warmup = args.warmup if args.warmup is not None else defaults["warmup"]
    steps = args.steps if args.steps is not None else defaults["steps"]
    workload = build_workload(name, args.workdir, args.seed, warmup, steps)
    info = report["models"][name] = workload.info
    log(
        f"{name}: {info['params'] / 1e6:.2f}M params, vocab {info['vocab_size']} "
        f"(tokenizer {info['tokenizer_vocab_size']}), {info['num_pairs']} pairs, "
        f"{statistics.mean(w['tokens'] for w in workload.work):.0f} real tokens/step, "
        f"{warmup} warm-up + {steps} counted steps"
    )
    ok_modes, skipped_modes = available_modes()
    plan = [("trl", "trl")] if with_trl else []
    plan += [("preftune", m) for m in args.modes or DEFAULT_MODES[name]]
    model_runs = []
    for trainer, mode in plan:
        if trainer == "preftune" and mode not in ok_modes:
            model_runs.append(
                {"model": name, "trainer": trainer, "mode": mode, "skipped": skipped_modes[mode]}
            )
            log(f"{name} {mode}: {skipped_modes[mode]}")
            continue
        if trainer == "trl":
            report["settings"]["trl_args"] = trl_args(len(workload.batches))
        report["peaks"]["float32"].append(matmul_peak("float32", seconds=1.5))
        log(
            f"{name} {trainer} {mode} (fp32 peak now {report['peaks']['float32'][-1]['best_gflops']} GFLOP/s) ..."
        )
        run_dir = args.workdir / name / "runs" / f"{trainer}_{mode}"
        model_runs.append(run_one(workload, name, trainer, mode, run_dir, args))
        for line in run_line(model_runs[-1]).splitlines():
            log(f"  {line}")
    check = report["step0_check"][name] = compare_to_trl(model_runs)
    report["runs"].extend(model_runs)
    log(f"{name} step-1 check: {json.dumps(check)}")


def main() -> None:
    args = parse_args()
    started = time.time()
    temporary = args.workdir is None
    args.workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_dpo_"))
    args.workdir.mkdir(parents=True, exist_ok=True)
    log(f"work directory {args.workdir}")
    load_start = load_average()
    # This machine's speed drifts (shared host): the peak is measured at the start, before every run and at
    # the end, and MFU is taken against the best of all of them (the most demanding denominator).
    peak_samples = {d: [matmul_peak(d)] for d in ("float32", "bfloat16")}
    log("matmul peak: " + ", ".join(f"{d} {v[0]['best_gflops']} GFLOP/s" for d, v in peak_samples.items()))
    with_trl = args.trl and trl_installed()
    report = new_report(args, peak_samples, load_start)
    for name in args.models:
        bench_model(name, args, report, with_trl)
    finish(report, peak_samples, started)
    print_summary(report)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2) + "\n")
        print(f"written {args.output}")
    if not args.keep and temporary:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
