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
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule
from transformers import AutoModelForCausalLM, PreTrainedModel

from preftune.modeling.logprobs import is_peft
from preftune.modeling.model import DPOModel
from preftune.training.distributed import barrier, unwrap

# DCP warns that it assumes one process when no process group exists: that is exactly the intent here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

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
    """Saves and finds checkpoints under ``output_dir/checkpoints``.

    ``model/`` is a plain Hugging Face directory written once by rank 0 (gathered from FSDP2 shards), or
    with LoRA the adapter in PEFT's format (``peft.PeftModel.from_pretrained(base, ckpt / "model")``);
    ``optimizer/`` is a ``torch.distributed.checkpoint`` directory keyed by parameter names, so a run
    resumes on the same or a different number of ranks.
    """

    def __init__(self, output_dir: str | Path, tokenizer: Any = None):
        self.root = Path(output_dir) / "checkpoints"
        self.tokenizer = tokenizer

    def save(
        self,
        step: int,
        *,
        model: DPOModel,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        trainer_state: dict,
    ) -> Path:
        """Collective: every rank calls it."""
        info = model.dist
        final = self.root / f"step_{step}"
        tmp = self.root / f".tmp_step_{step}"
        if info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier(info)
        if isinstance(unwrap(model.policy_logprobs), FSDPModule):
            full = get_model_state_dict(
                unwrap(model.policy_logprobs),
                options=StateDictOptions(full_state_dict=True, cpu_offload=True),
            )
            weights = {k.removeprefix("model."): v for k, v in full.items()}
        else:
            weights = None  # save_pretrained reads the (replicated) parameters itself
        if info.is_main:
            model.policy.save_pretrained(tmp / "model", state_dict=weights, safe_serialization=True)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp / "model")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(rng_state(), tmp / "rng.pt")
            (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2))
        dcp.save(
            get_optimizer_state_dict(unwrap(model.policy_logprobs), optimizer),
            checkpoint_id=tmp / "optimizer",
        )
        barrier(info)
        if info.is_main:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        barrier(info)
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
    def load_weights(path: Path, policy: PreTrainedModel) -> None:
        """Restore the policy's weights, or its LoRA adapter (before it is wrapped or sharded)."""
        if is_peft(policy):
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(policy, load_file(path / "model" / "adapter_model.safetensors"))
            return
        saved = AutoModelForCausalLM.from_pretrained(path / "model", dtype=policy.dtype)
        policy.load_state_dict(saved.state_dict())

    @staticmethod
    def load_training_state(
        path: Path, *, model: DPOModel, optimizer: torch.optim.Optimizer, scheduler: Any
    ) -> dict[str, Any]:
        """Restore optimizer (resharded to this run's ranks), scheduler and RNG; return the trainer state."""
        state = get_optimizer_state_dict(unwrap(model.policy_logprobs), optimizer)
        dcp.load(state, checkpoint_id=path / "optimizer")
        set_optimizer_state_dict(unwrap(model.policy_logprobs), optimizer, state)
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        set_rng_state(torch.load(path / "rng.pt", weights_only=False))
        return json.loads((path / STATE_FILE).read_text())
