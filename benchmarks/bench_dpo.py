"""Throughput and memory of preftune's DPO training modes against TRL's ``DPOTrainer``.

    .venv/bin/python benchmarks/bench_dpo.py --output runs/bench/bench_dpo.json          # the full run
    .venv/bin/python benchmarks/bench_dpo.py --models small --modes padded --steps 2     # a quick check

Everything is built locally (``preftune.tools.tiny``): Llama-style random-init models (hidden 256, 4 layers, 4
heads / 2 KV heads, MLP 720; "small": vocab 4,096, 5.1M parameters; "bigvocab": vocab 128,256 as Llama 3,
68.7M), a byte-level BPE trained on the generated text, and synthetic preference pairs (prompts 40-200
words, responses 20-200 words, fixed seed) in TRL's standard format (``prompt``/``chosen``/``rejected``),
read by both trainers from the same JSONL file.

Identical work for every run: fp32 weights, 8 pairs per optimizer step in one micro-batch (no gradient
accumulation), beta 0.1, AdamW lr 1e-6 (betas 0.9/0.98, non-fused), grad clip 1.0, no gradient
checkpointing (except the ``activation_checkpointing`` mode), a separate frozen reference model run every
step (except ``precompute``), max length 1024 (prompt + response; nothing is truncated), sdpa attention
(packed and shared-prompt modes: preftune's default there, ``preftune_varlen``; ``packed_masks``: sdpa).
TRL reads the pairs sequentially in the order preftune's sampler draws them (same seed), so step k of every
run trains on the same 8 pairs. Each trainer/mode runs in its own subprocess (the same script with
``--child``), so peak memory is isolated.

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
import contextlib
import dataclasses
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PAIRS_PER_STEP = 8
BETA = 0.1
LR = 1e-6
MAX_LENGTH = 1024
DATA_SEED = 1234  # preftune's data.seed: the sampler order TRL is given too
MODELS = {
    "small": {"vocab_size": 4096, "warmup": 2, "steps": 5},
    "bigvocab": {"vocab_size": 128_256, "warmup": 1, "steps": 2},
}
ARCH = {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "intermediate_size": 720}
# preftune modes: the config overrides of each (all keys must exist in preftune's default config).
MODES = {
    "padded": [],
    "grouped": ["data.micro_batch_size=2"],  # the same 8 pairs a step, in length-grouped micro-batches of 2
    "precompute": ["reference.mode=precompute"],
    "bf16_autocast": ["model.autocast=bfloat16"],
    "compile": ["model.compile=true"],
    "activation_checkpointing": ["model.activation_checkpointing=true"],
    # packed and shared-prompt rows run segment-wise attention (preftune_varlen) unless an attention is named
    "packed": ["data.packing=true"],
    "packed_masks": ["data.packing=true", "model.attn_implementation=sdpa"],  # one dense mask per row
    "share_prompt": ["data.share_prompt=true"],
    "packed_share_prompt": ["data.packing=true", "data.share_prompt=true"],
    # the switches combined: speed (prompt once, reference cached) and memory (plus activation checkpointing)
    "fast": ["data.share_prompt=true", "reference.mode=precompute", "data.micro_batch_size=2"],
    "lean": [
        "data.share_prompt=true",
        "reference.mode=precompute",
        "data.micro_batch_size=2",
        "model.activation_checkpointing=true",
    ],
}
DEFAULT_MODES = {
    "small": list(MODES),
    "bigvocab": ["padded", "grouped", "precompute", "fast", "lean"],
}
CHILD_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
    "DISABLE_MLFLOW_INTEGRATION": "TRUE",
    "WANDB_DISABLED": "true",
}


# -- memory ------------------------------------------------------------------------------------------
def proc_status_mib(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mib() -> float:
    hwm = proc_status_mib("VmHWM")
    if hwm is not None:
        return hwm
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PeakTracker:
    """Peak memory through the setup and through the training steps, on CPU (RSS) or CUDA (allocated)."""

    def __init__(self) -> None:
        import torch

        self.cuda = torch.cuda.is_available()
        self.base_rss_mib = proc_status_mib("VmRSS")  # after the imports, before any model
        self.setup_peak_mib: float | None = None
        self.train_peak_mib: float | None = None
        self.reset_ok = False

    def _peak(self) -> float:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20
        return peak_rss_mib()

    def before_first_step(self) -> None:
        import torch

        self.setup_peak_mib = self._peak()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.reset_ok = True
        else:
            self.reset_ok = reset_peak_rss()

    def after_step(self) -> None:
        self.train_peak_mib = self._peak()

    def report(self) -> dict[str, Any]:
        train = self.train_peak_mib
        setup = self.setup_peak_mib
        whole = max(x for x in (setup, train) if x is not None) if (setup or train) else None
        return {
            "memory_kind": "cuda_max_allocated" if self.cuda else "rss",
            "peak_mib": whole,
            "setup_peak_mib": setup,
            "train_peak_mib": train if self.reset_ok else None,
            "base_rss_mib": self.base_rss_mib,
        }


# -- machine -----------------------------------------------------------------------------------------
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


# -- data and models ---------------------------------------------------------------------------------
def make_lexicon(rng: random.Random, size: int = 20_000) -> list[str]:
    onsets = ["", "b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z"]
    onsets += ["br", "ch", "cl", "dr", "fl", "gr", "pl", "sh", "st", "th", "tr"]
    nuclei = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "io"]
    codas = ["", "", "n", "r", "s", "t", "l", "m", "nd", "st"]
    syllables = [o + v + c for o in onsets for v in nuclei for c in codas]
    words: set[str] = set()
    while len(words) < size:
        words.add("".join(rng.choice(syllables) for _ in range(rng.choice((1, 1, 2, 2, 2, 3, 3, 4)))))
    out = sorted(words)
    rng.shuffle(out)
    return out


class TextGen:
    """Zipf-distributed pseudo-words with light punctuation (deterministic from the seed)."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.words = make_lexicon(self.rng)
        weights = [1.0 / (rank + 2) for rank in range(len(self.words))]
        self.cum = []
        total = 0.0
        for w in weights:
            total += w
            self.cum.append(total)

    def sentence_words(self, n: int) -> str:
        words = self.rng.choices(self.words, cum_weights=self.cum, k=n)
        out = []
        for i, w in enumerate(words):
            out.append(w)
            if i < n - 1 and self.rng.random() < 0.08:
                out[-1] += self.rng.choice((",", ".", ";"))
        return " ".join(out)

    def pair(self) -> dict[str, str]:
        rng = self.rng
        prompt = self.sentence_words(rng.randint(40, 200)) + "?"
        # Responses start with a space and the prompt ends with "?", so prompt + response tokenizes as the
        # concatenation of the two (TRL tokenizes the joined text; preftune the parts).
        chosen = " " + self.sentence_words(rng.randint(20, 200)) + "."
        rejected = " " + self.sentence_words(rng.randint(20, 200)) + "."
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def build_model_dir(
    name: str, vocab_size: int, pairs: list[dict[str, str]], corpus: list[str], out: Path
) -> dict[str, Any]:
    """Tokenizer (trained on the corpus and the pairs) and model, saved to ``out``; returns their sizes."""
    from preftune.tools.tiny import build_tiny_model, save_tiny, train_tokenizer

    texts = corpus + [p[k] for p in pairs for k in ("prompt", "chosen", "rejected")]
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    model = build_tiny_model(
        "llama",
        vocab_size,
        hidden_size=ARCH["hidden_size"],
        num_layers=ARCH["num_layers"],
        num_heads=ARCH["num_heads"],
        intermediate_size=ARCH["intermediate_size"],
        max_position_embeddings=MAX_LENGTH,
        seed=0,
    )
    save_tiny(model, tokenizer, out)
    config = model.config
    body = sum(p.numel() for n, p in model.model.layers.named_parameters() if p.ndim >= 2)
    head = model.get_output_embeddings().weight.numel()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    info = {
        "name": name,
        "path": str(out),
        "params": sum(p.numel() for p in model.parameters()),
        "body_matmul_params": body,
        "lm_head_params": head,
        "vocab_size": config.vocab_size,
        "tokenizer_vocab_size": len(tokenizer),
        "hidden_size": config.hidden_size,
        "num_layers": config.num_hidden_layers,
        "attention_dim": config.num_attention_heads * head_dim,
        **{k: v for k, v in ARCH.items() if k not in ("hidden_size", "num_layers")},
    }
    del model
    return info


def pair_lengths(model_dir: Path, pairs: list[dict[str, str]]) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) token counts of each pair, tokenized as preftune does."""
    from transformers import AutoTokenizer

    from preftune.data.tokenize import PairTokenizer

    pair_tokenizer = PairTokenizer(AutoTokenizer.from_pretrained(model_dir), MAX_LENGTH)
    out = []
    for i, pair in enumerate(pairs):
        ex = pair_tokenizer({**pair, "chosen_reward": 1.0, "rejected_reward": 0.0})
        if isinstance(ex, str):
            raise RuntimeError(f"pair {i} was dropped by preftune's tokenizer: {ex}")
        out.append((len(ex["prompt_ids"]), len(ex["chosen_ids"]), len(ex["rejected_ids"])))
    return out


def batch_order(num_pairs: int) -> list[list[int]]:
    """The global batches preftune's sampler draws in epoch 0 (what TRL is given, in order)."""
    from preftune.data.sampler import GlobalBatchSampler

    sampler = GlobalBatchSampler(num_pairs, PAIRS_PER_STEP, seed=DATA_SEED, shuffle=True, drop_last=True)
    sampler.set_epoch(0)
    return list(sampler)


def step_workload(lengths: list[tuple[int, int, int]], batches: list[list[int]], model: dict) -> list[dict]:
    """Real tokens and useful FLOPs (see the module docstring) of each step's batch: ``flops`` for the standard
    workload, ``flops_shared``/``flops_precompute``/``flops_shared_precompute`` for the work that a shared
    prompt, a cached reference or both leave to do (the strict MFU's numerator)."""
    n_body, n_head = model["body_matmul_params"], model["lm_head_params"]
    attn = model["num_layers"] * model["attention_dim"]

    def flops(batch: list[int], share_prompt: bool, reference: bool) -> int:
        # (token, parameter) products and causal (query, key) pairs, x2 FLOPs per multiply-add: forward 2,
        # forward + backward 6; attention forward = 2 matmuls (QK^T, AV) over the pairs, D wide.
        tokens = responses = pairs = 0
        for i in batch:
            prompt, chosen, rejected = lengths[i]
            responses += chosen + rejected
            if share_prompt:  # prompt+chosen causal, rejected over the prompt and itself
                tokens += prompt + chosen + rejected
                pairs += (prompt + chosen) ** 2 / 2 + rejected * prompt + rejected**2 / 2
            else:
                tokens += 2 * prompt + chosen + rejected
                pairs += (prompt + chosen) ** 2 / 2 + (prompt + rejected) ** 2 / 2
        per_pass = n_body * tokens + n_head * responses + 2 * attn * pairs  # multiply-adds of one forward
        return round(2 * per_pass * (3 + (1 if reference else 0)))

    out = []
    for batch in batches:
        real = [lengths[i][0] + resp for i in batch for resp in lengths[i][1:]]
        out.append(
            {
                "tokens": sum(real),
                "max_len": max(real),
                "flops": flops(batch, share_prompt=False, reference=True),
                "flops_shared": flops(batch, share_prompt=True, reference=True),
                "flops_precompute": flops(batch, share_prompt=False, reference=False),
                "flops_shared_precompute": flops(batch, share_prompt=True, reference=False),
            }
        )
    return out


# -- children ----------------------------------------------------------------------------------------
def child_preftune(spec: dict[str, Any]) -> dict[str, Any]:
    tracker = PeakTracker()
    import torch

    import preftune.training.recipe as recipe
    from preftune.config import load_config
    from preftune.training.trainer import DPOTrainer

    out_dir = Path(spec["run_dir"]) / "preftune"
    overrides = [
        f"model.path={spec['model_dir']}",
        "model.dtype=float32",
        f"output_dir={out_dir}",
        f"data.train={spec['data_path']}",
        "data.format=trl",
        f"data.max_seq_length={MAX_LENGTH}",
        f"data.micro_batch_size={PAIRS_PER_STEP}",
        f"data.global_batch_size={PAIRS_PER_STEP}",
        f"data.seed={DATA_SEED}",
        f"dpo.ref_policy_kl_penalty={BETA}",
        "dpo.preference_loss=dpo",
        f"optim.lr={LR}",
        "optim.weight_decay=0.0",
        "optim.sched.warmup_steps=0",
        f"trainer.max_steps={spec['total_steps']}",
        "trainer.max_epochs=1",
        f"trainer.val_check_interval={10**6}",
        f"trainer.save_interval={10**6}",
        "trainer.limit_val_batches=0",
        "trainer.gradient_clip_val=1.0",
        "trainer.log_every_n_steps=1",
        "reference.mode=online",
        *spec["overrides"],
    ]
    cfg = load_config(None, overrides)

    timings: dict[str, float] = {}
    original_precompute = getattr(recipe, "precompute_reference", None)
    if original_precompute is not None:

        def timed_precompute(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            result = original_precompute(*args, **kwargs)
            timings["precompute_s"] = time.perf_counter() - t0
            return result

        recipe.precompute_reference = timed_precompute

    original_step = DPOTrainer.train_single_step
    steps_done = [0]

    def tracked_step(self: Any, global_batch: Any) -> Any:
        if steps_done[0] == 0:
            tracker.before_first_step()
        result = original_step(self, global_batch)
        steps_done[0] += 1
        tracker.after_step()
        return result

    DPOTrainer.train_single_step = tracked_step
    t0 = time.perf_counter()
    recipe.train(cfg)
    wall = time.perf_counter() - t0

    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line]
    train = sorted((r for r in records if "train/step_time" in r), key=lambda r: r["step"])
    return {
        "step_times": [r["train/step_time"] for r in train],
        "losses": [r.get("train/loss") for r in train],
        "step1": {
            "loss": train[0].get("train/loss") if train else None,
            "logps_chosen_mean": train[0].get("train/logps_chosen_mean") if train else None,
            "logps_rejected_mean": train[0].get("train/logps_rejected_mean") if train else None,
        },
        "trainer_tokens": [
            round(r["train/tokens_per_sec"] * r["train/step_time"])
            for r in train
            if "train/tokens_per_sec" in r
        ],
        "wall_s": wall,
        "precompute_s": timings.get("precompute_s"),
        "threads": torch.get_num_threads(),
        **tracker.report(),
    }


def child_trl(spec: dict[str, Any]) -> dict[str, Any]:
    tracker = PeakTracker()
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    records = [json.loads(line) for line in Path(spec["data_path"]).read_text().splitlines() if line]
    ordered = [records[i] for batch in spec["batches"] for i in batch]
    dataset = Dataset.from_list(ordered)
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])

    class StepClock(TrainerCallback):
        """Wall time of each optimizer step, on_step_begin to on_step_end, and the memory peaks."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self.t0 = 0.0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if not self.times:
                tracker.before_first_step()
            if tracker.cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if tracker.cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.t0)
            tracker.after_step()

    clock = StepClock()
    kwargs = dict(spec["trl_args"], dataloader_pin_memory=tracker.cuda)
    if "activation_checkpointing" in {f.name for f in dataclasses.fields(DPOConfig)}:
        kwargs["activation_checkpointing"] = False  # transformers 5's name of gradient_checkpointing
    args = DPOConfig(**kwargs, output_dir=str(Path(spec["run_dir"]) / "trl"))
    trainer = DPOTrainer(
        model=spec["model_dir"],
        ref_model=None,  # TRL creates the separate frozen reference from the same directory
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[clock],
    )
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    logs = [h for h in trainer.state.log_history if "loss" in h and "step" in h]
    cumulative = [h.get("num_tokens") for h in logs]
    tokens = (
        [int(b - a) for a, b in zip([0, *cumulative[:-1]], cumulative, strict=True)]
        if all(c is not None for c in cumulative)
        else []
    )
    first = logs[0] if logs else {}
    return {
        "step_times": clock.times,
        "losses": [h["loss"] for h in logs],
        "step1": {
            "loss": first.get("loss"),
            "logps_chosen_mean": first.get("logps/chosen"),
            "logps_rejected_mean": first.get("logps/rejected"),
        },
        "trainer_tokens": tokens,
        "wall_s": wall,
        "threads": torch.get_num_threads(),
        "reference_model_separate": trainer.ref_model is not None,
        "activation_checkpointing_on": bool(
            getattr(trainer.model, "is_activation_checkpointing", None)
            or getattr(trainer.model, "is_gradient_checkpointing", False)
        ),
        **tracker.report(),
    }


def trl_args(total_steps: int) -> dict[str, Any]:
    """DPOConfig matching preftune's settings (TRL defaults changed: bf16, gradient checkpointing, the
    fused AdamW, beta2, logging)."""
    return {
        "per_device_train_batch_size": PAIRS_PER_STEP,
        "gradient_accumulation_steps": 1,
        "max_steps": total_steps,
        "num_train_epochs": 1,
        "learning_rate": LR,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0,
        "optim": "adamw_torch",
        "adam_beta1": 0.9,
        "adam_beta2": 0.98,
        "adam_epsilon": 1e-8,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "beta": BETA,
        "loss_type": ["sigmoid"],
        "max_length": MAX_LENGTH,
        "bf16": False,
        "fp16": False,
        "gradient_checkpointing": False,
        "precompute_ref_log_probs": False,
        "disable_dropout": True,
        "model_init_kwargs": {"dtype": "float32", "attn_implementation": "sdpa"},
        "train_sampling_strategy": "sequential",
        "dataloader_num_workers": 0,
        "logging_steps": 1,
        "save_strategy": "no",
        "eval_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "seed": DATA_SEED,
    }


def run_child(spec: dict[str, Any], run_dir: Path, timeout: float | None) -> dict[str, Any]:
    """Run one trainer/mode in a fresh process; its result, or {"error": ...}."""
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "run_dir": str(run_dir), "result_path": str(run_dir / "result.json")}
    spec_path = run_dir / "spec.json"
    spec_path.write_text(json.dumps(spec))
    log_path = run_dir / "log.txt"
    env = {**os.environ, **CHILD_ENV, "TORCHINDUCTOR_CACHE_DIR": str(run_dir / "inductor")}
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        try:
            proc = subprocess.run(
                [sys.executable, __file__, "--child", str(spec_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                timeout=timeout,
                check=False,
            )
            rc: int | str = proc.returncode
        except subprocess.TimeoutExpired:
            rc = f"timeout after {timeout} s"
    elapsed = time.perf_counter() - t0
    result_path = Path(spec["result_path"])
    if rc == 0 and result_path.is_file():
        result = json.loads(result_path.read_text())
    else:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
        result = {"error": f"exit {rc}", "log_tail": tail}
    result["process_s"] = round(elapsed, 1)
    return result


def child_main(spec_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    result = child_trl(spec) if spec["trainer"] == "trl" else child_preftune(spec)
    Path(spec["result_path"]).write_text(json.dumps(result))


# -- summary -----------------------------------------------------------------------------------------
def performed_flops_key(overrides: list[str]) -> str:
    """The ``step_workload`` key of the FLOPs a run with these overrides performs (its strict MFU)."""
    shared, cached = "data.share_prompt=true" in overrides, "reference.mode=precompute" in overrides
    return "flops" + "_shared" * shared + "_precompute" * cached


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


# -- main --------------------------------------------------------------------------------------------
def available_modes() -> tuple[set[str], dict[str, str]]:
    """The modes whose config keys exist in preftune's default config, and why the others are skipped."""
    from omegaconf import OmegaConf

    from preftune.config import default_config

    cfg = default_config()
    absent = object()
    ok, skipped = set(), {}
    for mode, overrides in MODES.items():
        keys = [o.split("=", 1)[0] for o in overrides]
        missing = [k for k in keys if OmegaConf.select(cfg, k, default=absent) is absent]
        if missing:
            skipped[mode] = f"skipped: preftune's config has no {', '.join(missing)}"
        else:
            ok.add(mode)
    return ok, skipped


def main() -> None:
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
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child_main(args.child)
        return

    started = time.time()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_dpo_"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"[bench_dpo] work directory {workdir}", flush=True)
    load_start = load_average()
    # This machine's speed drifts (shared host): the peak is measured at the start, before every run and at
    # the end, and MFU is taken against the best of all of them (the most demanding denominator).
    peak_samples: dict[str, list[dict[str, Any]]] = {d: [matmul_peak(d)] for d in ("float32", "bfloat16")}
    print(
        "[bench_dpo] matmul peak: "
        + ", ".join(f"{d} {v[0]['best_gflops']} GFLOP/s" for d, v in peak_samples.items()),
        flush=True,
    )
    ok_modes, skipped_modes = available_modes()
    trl_available = True
    if args.trl:
        try:
            import trl  # noqa: F401
        except ImportError:
            trl_available = False
            print(
                "[bench_dpo] trl is not installed (pip install -e '.[bench]'): TRL runs skipped", flush=True
            )

    report: dict[str, Any] = {
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
        "flops_definition": None,
        "models": {},
        "runs": [],
        "step0_check": {},
    }
    report["flops_definition"] = (
        "F_seq = 8 * (N_body*T + N_head*R + L*D*T^2) per sequence (prompt + one response; T tokens, R of them "
        "response tokens incl. EOS): policy forward+backward (6 FLOPs/param/token, 3x the causal attention "
        "forward 2*L*D*T^2) + reference forward (2 FLOPs/param/token, 1x); N_body = weight matrices of the "
        "blocks, N_head = vocab*hidden on the R response-predicting positions only, D = heads*head_dim. Same "
        "workload for every mode and for TRL (a precomputed reference is still credited)."
    )

    for name in args.models:
        spec_m = MODELS[name]
        warmup = args.warmup if args.warmup is not None else spec_m["warmup"]
        steps = args.steps if args.steps is not None else spec_m["steps"]
        total = warmup + steps
        num_pairs = total * PAIRS_PER_STEP
        modes = args.modes or DEFAULT_MODES[name]

        # Data and model (the same text for both models; each has its own tokenizer).
        gen = TextGen(args.seed)
        pairs = [gen.pair() for _ in range(num_pairs)]
        corpus = [gen.sentence_words(100) for _ in range(3000)]
        model_dir = workdir / name / "model"
        t0 = time.perf_counter()
        model_info = build_model_dir(name, spec_m["vocab_size"], pairs, corpus, model_dir)
        data_path = workdir / name / "pairs.jsonl"
        data_path.write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
        lengths = pair_lengths(model_dir, pairs)
        batches = batch_order(num_pairs)
        work = step_workload(lengths, batches, model_info)
        model_info.update(
            num_pairs=num_pairs,
            warmup_steps=warmup,
            counted_steps=steps,
            build_s=round(time.perf_counter() - t0, 1),
            mean_prompt_tokens=round(statistics.mean(x[0] for x in lengths), 1),
            mean_response_tokens=round(statistics.mean(x[i] for x in lengths for i in (1, 2)), 1),
            max_sequence_tokens=max(w["max_len"] for w in work),
            tokens_per_step=[w["tokens"] for w in work],
            flops_per_step=[w["flops"] for w in work],
        )
        report["models"][name] = model_info
        print(
            f"[bench_dpo] {name}: {model_info['params'] / 1e6:.2f}M params, vocab {model_info['vocab_size']} "
            f"(tokenizer {model_info['tokenizer_vocab_size']}), {num_pairs} pairs, "
            f"{statistics.mean(w['tokens'] for w in work):.0f} real tokens/step, "
            f"{warmup} warm-up + {steps} counted steps",
            flush=True,
        )

        base_spec = {
            "model": name,
            "model_dir": str(model_dir),
            "data_path": str(data_path),
            "total_steps": total,
            "batches": batches,
        }
        plan: list[tuple[str, str]] = []
        if args.trl and trl_available:
            plan.append(("trl", "trl"))
        plan += [("preftune", m) for m in modes]
        model_runs = []
        for trainer, mode in plan:
            run: dict[str, Any] = {"model": name, "trainer": trainer, "mode": mode}
            if trainer == "preftune" and mode not in ok_modes:
                run["skipped"] = skipped_modes.get(mode, "skipped")
                model_runs.append(run)
                print(f"[bench_dpo] {name} {mode}: {run['skipped']}", flush=True)
                continue
            spec = {**base_spec, "trainer": trainer, "mode": mode, "overrides": MODES.get(mode, [])}
            if trainer == "trl":
                spec["trl_args"] = trl_args(total)
                report["settings"]["trl_args"] = spec["trl_args"]
            run_dir = workdir / name / "runs" / f"{trainer}_{mode}"
            peak_samples["float32"].append(matmul_peak("float32", seconds=1.5))
            print(
                f"[bench_dpo] {name} {trainer} {mode} (fp32 peak now "
                f"{peak_samples['float32'][-1]['best_gflops']} GFLOP/s) ...",
                flush=True,
            )
            result = run_child(spec, run_dir, args.timeout)
            if not args.keep:
                shutil.rmtree(run_dir / "preftune", ignore_errors=True)
                shutil.rmtree(run_dir / "trl", ignore_errors=True)
                shutil.rmtree(run_dir / "inductor", ignore_errors=True)
            run.update(result)
            if "error" not in result:
                performed = performed_flops_key(spec.get("overrides", []))
                summary = summarize(result, work, warmup, performed)
                run.update(summary)
                if mode == "compile":
                    run["compile_s"] = summary.get("warmup_overhead_s")
            model_runs.append(run)
            if run.get("error"):
                print(f"[bench_dpo]   failed: {run['error']}", flush=True)
                for line in run.get("log_tail", []):
                    print(f"[bench_dpo]   | {line}", flush=True)
            else:
                extra = f", precompute {run['precompute_s']:.1f} s" if run.get("precompute_s") else ""
                extra += f", compile {run['compile_s']:.1f} s" if run.get("compile_s") is not None else ""
                print(
                    f"[bench_dpo]   {run['s_per_step']:.3f} s/step, {run['pairs_per_s']:.2f} pairs/s, "
                    f"peak {run['peak_mib']:.0f} MiB, {run['performed_flops_per_s'] / 1e9:.0f} GFLOP/s performed, "
                    f"step-1 loss {run['step1']['loss']}{extra} ({run['process_s']:.0f} s)",
                    flush=True,
                )

        trl_run = next((r for r in model_runs if r["trainer"] == "trl" and "s_per_step" in r), None)
        for r in model_runs:
            if trl_run is not None and "s_per_step" in r and r is not trl_run:
                r["x_trl_pairs_per_s"] = round(r["pairs_per_s"] / trl_run["pairs_per_s"], 3)
                r["x_trl_memory"] = round(r["peak_mib"] / trl_run["peak_mib"], 3)
        # preftune's side of the check: the padded run, else the first preftune run with an online reference.
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
        report["step0_check"][name] = check
        report["runs"].extend(model_runs)
        print(f"[bench_dpo] {name} step-1 check: {json.dumps(check)}", flush=True)

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
    print()
    print_table(report["runs"])
    for name, check in report["step0_check"].items():
        print(
            f"step-1 loss ({name}): preftune {check.get('preftune_step1_loss')}, "
            f"TRL {check.get('trl_step1_loss')} (log 2 = {check['log2']})"
        )
    print(
        f"matmul peak (best of {len(peak_samples['float32'])} measurements): fp32 {peaks['float32']} GFLOP/s, "
        f"bf16 {peaks['bfloat16']} GFLOP/s; total {report['total_s']:.0f} s"
    )
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2) + "\n")
        print(f"written {args.output}")
    if not args.keep and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
