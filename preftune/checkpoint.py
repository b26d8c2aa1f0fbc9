"""Checkpoints: ``output_dir/checkpoints/step_N/`` with a Hugging Face ``model/`` and the training state.

A checkpoint is written under a temporary name and renamed when complete, so a crash mid-save never
leaves a directory that looks like a checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

STEP_DIR = re.compile(r"^step_(\d+)$")
STATE_FILE = "trainer_state.json"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """Saves and finds checkpoints under ``output_dir/checkpoints``."""

    def __init__(self, output_dir: str | Path, tokenizer: Any = None):
        self.root = Path(output_dir) / "checkpoints"
        self.tokenizer = tokenizer

    def save(
        self,
        step: int,
        *,
        policy: PreTrainedModel,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        trainer_state: dict[str, Any],
    ) -> Path:
        final = self.root / f"step_{step}"
        tmp = self.root / f".tmp_step_{step}_{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        policy.save_pretrained(tmp / "model", safe_serialization=True)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(tmp / "model")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        return final

    def latest(self) -> Path | None:
        """The complete checkpoint with the highest step, if any."""
        if not self.root.is_dir():
            return None
        found = [
            (int(m.group(1)), p)
            for p in self.root.iterdir()
            if (m := STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()
        ]
        return max(found)[1] if found else None

    @staticmethod
    def load(
        path: Path, *, policy: PreTrainedModel, optimizer: torch.optim.Optimizer, scheduler: Any
    ) -> dict[str, Any]:
        """Restore weights, optimizer, scheduler and RNG from ``path``; return the trainer state."""
        saved = AutoModelForCausalLM.from_pretrained(path / "model", dtype=policy.dtype)
        policy.load_state_dict(saved.state_dict())
        del saved
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        set_rng_state(torch.load(path / "rng.pt", weights_only=False))
        return json.loads((path / STATE_FILE).read_text())
