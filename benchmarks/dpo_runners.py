"""The benchmark's runners: each trainer/mode runs in a fresh process (this file, given a spec file), so its
peak memory is its own. ``run_child`` starts one and reads back its result; ``child_preftune`` and
``child_trl`` train and time inside it."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from dpo_workload import BETA, DATA_SEED, LR, MAX_LENGTH, PAIRS_PER_STEP

CHILD_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
    "DISABLE_MLFLOW_INTEGRATION": "TRUE",
    "WANDB_DISABLED": "true",
}


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


def preftune_overrides(spec: dict[str, Any], out_dir: Path) -> list[str]:
    """preftune's config for the benchmark's settings, plus the mode's own overrides."""
    return [
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


def time_precompute(recipe: Any, timings: dict[str, float]) -> None:
    """Record the reference pass's seconds in ``timings["precompute_s"]`` (when the recipe has one)."""
    original = getattr(recipe, "precompute_reference", None)
    if original is None:
        return

    def timed_precompute(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        result = original(*args, **kwargs)
        timings["precompute_s"] = time.perf_counter() - t0
        return result

    recipe.precompute_reference = timed_precompute


def track_steps(trainer_class: Any, tracker: PeakTracker) -> None:
    """Reset the memory peak before the first training step and read it after every step."""
    original_step = trainer_class.train_single_step
    steps_done = [0]

    def tracked_step(self: Any, global_batch: Any) -> Any:
        if steps_done[0] == 0:
            tracker.before_first_step()
        result = original_step(self, global_batch)
        steps_done[0] += 1
        tracker.after_step()
        return result

    trainer_class.train_single_step = tracked_step


def child_preftune(spec: dict[str, Any]) -> dict[str, Any]:
    tracker = PeakTracker()
    import torch

    import preftune.recipe as recipe
    from preftune.config_checks import load_config
    from preftune.training.trainer import DPOTrainer

    out_dir = Path(spec["run_dir"]) / "preftune"
    cfg = load_config(None, preftune_overrides(spec, out_dir))
    timings: dict[str, float] = {}
    time_precompute(recipe, timings)
    track_steps(DPOTrainer, tracker)
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


def step_clock(tracker: PeakTracker) -> Any:
    """A TRL ``TrainerCallback`` timing each optimizer step, on_step_begin to on_step_end, and reading the
    memory peaks."""
    import torch
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
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

    return StepClock()


def child_trl(spec: dict[str, Any]) -> dict[str, Any]:
    tracker = PeakTracker()
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    records = [json.loads(line) for line in Path(spec["data_path"]).read_text().splitlines() if line]
    ordered = [records[i] for batch in spec["batches"] for i in batch]
    clock = step_clock(tracker)
    kwargs = dict(spec["trl_args"], dataloader_pin_memory=tracker.cuda)
    if "activation_checkpointing" in {f.name for f in dataclasses.fields(DPOConfig)}:
        kwargs["activation_checkpointing"] = False  # transformers 5's name of gradient_checkpointing
    args = DPOConfig(**kwargs, output_dir=str(Path(spec["run_dir"]) / "trl"))
    trainer = DPOTrainer(
        model=spec["model_dir"],
        ref_model=None,  # TRL creates the separate frozen reference from the same directory
        args=args,
        train_dataset=Dataset.from_list(ordered),
        processing_class=AutoTokenizer.from_pretrained(spec["model_dir"]),
        callbacks=[clock],
    )
    t0 = time.perf_counter()
    trainer.train()
    return trl_result(trainer, clock.times, time.perf_counter() - t0, tracker)


def trl_result(trainer: Any, step_times: list[float], wall: float, tracker: PeakTracker) -> dict[str, Any]:
    """A TRL run's result, in the keys of ``child_preftune``'s (read from TRL's log history)."""
    import torch

    logs = [h for h in trainer.state.log_history if "loss" in h and "step" in h]
    cumulative = [h.get("num_tokens") for h in logs]
    tokens = (
        [int(b - a) for a, b in zip([0, *cumulative[:-1]], cumulative, strict=True)]
        if all(c is not None for c in cumulative)
        else []
    )
    first = logs[0] if logs else {}
    return {
        "step_times": step_times,
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
                [sys.executable, __file__, str(spec_path)],
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


if __name__ == "__main__":
    child_main(Path(sys.argv[1]))
