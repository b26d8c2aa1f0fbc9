"""Checkpoints: ``output_dir/checkpoints/step_N/`` with a Hugging Face ``model/`` and the training state.

A checkpoint is written under a temporary name, its manifest (sizes, checksums) last, and renamed when
complete, so a crash mid-save never leaves a directory that looks like a checkpoint. A save that fails
(full disk, quota, I/O error: whatever the writer raises, an ``OSError``, safetensors' ``SafetensorError``,
or torch's ``RuntimeError`` wrapped in DCP's ``CheckpointException``) removes its partial files and stops
the run with one line: the cause, the free space, what a checkpoint needs, how to resume; retention
(``trainer.keep_last``/``keep_best``) deletes older checkpoints only after the new one is complete. A
resume verifies the newest checkpoint against its manifest and falls back to the previous one if it is
damaged. Only tensors and plain values are ever loaded (``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import random
import re
import shutil
import warnings
from collections.abc import Callable, Iterator
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
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule
from transformers import AutoModelForCausalLM, PreTrainedModel

from preftune.errors import CheckpointError, NonFiniteError
from preftune.file_modes import apply_umask
from preftune.modeling.logprobs import is_peft
from preftune.modeling.model import DPOModel
from preftune.modeling.parallel import any_rank, barrier, unwrap
from preftune.run_dir import RunDir
from preftune.training.manifest import MANIFEST, manifest_bytes, problem, write_manifest
from preftune.training.nonfinite import nonfinite_parameters
from preftune.training.retention import Retention, SavedCheckpoint, checkpoints_to_delete

STEP_DIR = re.compile(r"^step_(\d+)$")
STATE_FILE = "trainer_state.json"
VAL_METRICS_FILE = "val_metrics.json"  # the validation metrics of the checkpoint's step, if validated there


@contextlib.contextmanager
def one_process_dcp() -> Iterator[None]:
    """DCP warns that it assumes one process when no process group exists: exactly the intent here, so that
    warning is silenced inside this block (and nowhere else)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="torch.distributed is disabled, unavailable or uninitialized"
        )
        yield


def rng_state() -> dict[str, Any]:
    """Every generator's state as tensors and plain values (loadable with ``weights_only=True``)."""
    name, keys, *rest = np.random.get_state()
    numpy_state = [name, torch.from_numpy(keys.astype(np.int64)), *rest]
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
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

    def __init__(self, output_dir: str | Path, tokenizer: Any = None, retention: Retention | None = None):
        self.root = RunDir(output_dir).checkpoints
        self.tokenizer = tokenizer
        self.retention = retention or Retention()
        self.resumed_from: int | None = None  # the step resumed from: retention never deletes it

    def save(
        self,
        step: int,
        *,
        model: DPOModel,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        trainer_state: dict,
        val_metrics: dict[str, float] | None = None,
    ) -> Path:
        """Collective: every rank calls it. ``val_metrics``: the validation of this step, if any."""
        info = model.dist
        bad = nonfinite_parameters(model.policy)
        if any_rank(bool(bad), info):
            raise NonFiniteError(
                f"step {step}: the weights are no longer finite ({', '.join(bad[:3]) or 'on another rank'}), "
                f"not saved; the last checkpoint in {self.root} holds finite ones: lower optim.lr or set "
                "trainer.gradient_clip_val"
            )
        final = self.root / f"step_{step}"
        tmp = self.root / f".tmp_step_{step}"
        error: BaseException | None = None
        try:
            self._write(tmp, model, optimizer, scheduler, trainer_state, val_metrics)
        # any writer's failure: the partial checkpoint must not stay behind (DCP's exception, which gathers
        # every rank's failure, is a BaseException: it would pass an ``except Exception``)
        except (Exception, dcp.api.CheckpointException) as e:
            error = e
        if any_rank(error is not None, info):
            if info.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise self._save_failed(step, error, model, optimizer) from error
        if info.is_main:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._apply_retention(step)
        barrier(info)
        return final

    def _write(
        self,
        tmp: Path,
        model: DPOModel,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        trainer_state: dict,
        val_metrics: dict[str, float] | None,
    ) -> None:
        """Write every file of the checkpoint into ``tmp``, the manifest last (collective)."""
        info = model.dist
        main_error: Exception | None = None
        if info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                tmp.mkdir(parents=True)
            except OSError as e:
                main_error = e
        if any_rank(main_error is not None, info):
            raise main_error or OSError(errno.EIO, "failed on rank 0")
        if isinstance(unwrap(model.policy_logprobs), FSDPModule):
            full = get_model_state_dict(
                unwrap(model.policy_logprobs),
                options=StateDictOptions(full_state_dict=True, cpu_offload=True),
            )
            weights = {k.removeprefix("model."): v for k, v in full.items()}
        else:
            weights = None  # save_pretrained reads the (replicated) parameters itself
        if info.is_main:
            try:
                model.policy.save_pretrained(tmp / "model", state_dict=weights, safe_serialization=True)
                apply_umask(tmp / "model")
                if self.tokenizer is not None:
                    self.tokenizer.save_pretrained(tmp / "model")
                torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
                torch.save(rng_state(), tmp / "rng.pt")
                (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2))
                if val_metrics is not None:
                    (tmp / VAL_METRICS_FILE).write_text(json.dumps(val_metrics, indent=2))
            except Exception as e:  # safetensors and torch.save raise their own types on a full disk
                main_error = e
        if any_rank(main_error is not None, info):  # the other ranks must not wait in dcp.save
            raise main_error or OSError(errno.EIO, "failed on rank 0")
        if optimizer.state:  # empty until a step is applied (every step so far skipped): nothing to save
            with one_process_dcp():
                dcp.save(
                    get_optimizer_state_dict(unwrap(model.policy_logprobs), optimizer),
                    checkpoint_id=tmp / "optimizer",
                )
        barrier(info)
        if info.is_main:
            try:
                write_manifest(tmp)
            except OSError as e:
                main_error = e
        if any_rank(main_error is not None, info):
            raise main_error or OSError(errno.EIO, "failed on rank 0")

    def _save_failed(
        self, step: int, error: BaseException | None, model: DPOModel, optimizer: torch.optim.Optimizer
    ) -> CheckpointError:
        """The one line a failed save ends the run with: where, why, the free space against what a checkpoint
        needs, how to resume. ``error``: this rank's failure (None when another rank failed)."""
        previous = self.complete()
        if previous:
            needed = manifest_bytes(previous[-1][1])
            needs = f"about {needed:,} bytes (the size of {previous[-1][1].name})"
        else:
            tensors = [*model.policy.state_dict().values()]
            tensors += [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
            needed = sum(t.numel() * t.element_size() for t in tensors)
            needs = f"at least {needed:,} bytes (weights + optimizer)"
        try:
            free: int | None = shutil.disk_usage(self.root).free
        except OSError:
            free = None
        cause = root_cause(error)
        full = (isinstance(cause, OSError) and cause.errno in FULL_ERRNOS) or (
            free is not None and free < needed
        )
        why = describe(cause) if cause is not None else "failed on another rank"
        last = f"resumes from {previous[-1][1].name}" if previous else "starts over"
        return CheckpointError(
            f"could not save checkpoint step_{step} in {self.root}: {'the disk is full' if full else 'the write failed'}"
            f" ({why}); {'free space unknown' if free is None else f'{free:,} bytes free'} on that filesystem, "
            f"a checkpoint needs {needs}. The partial checkpoint was removed; free space and run the same command "
            f"(it {last})"
        )

    def _apply_retention(self, step: int) -> None:
        """Delete the checkpoints ``self.retention`` no longer keeps, now that step ``step``'s is complete."""
        metric = self.retention.best_metric
        saved = []
        for ckpt_step, path in self.complete():
            value = None
            if metric is not None and (path / VAL_METRICS_FILE).is_file():
                values = json.loads((path / VAL_METRICS_FILE).read_text())
                if metric not in values:
                    raise CheckpointError(
                        f"trainer.keep_best.metric={metric}: validation logs none such; use one of "
                        f"{', '.join(sorted(values))}"
                    )
                value = values[metric]
            saved.append(SavedCheckpoint(ckpt_step, value))
        protected = [self.resumed_from] if self.resumed_from is not None else []
        for old in checkpoints_to_delete(saved, step, self.retention, protected):
            shutil.rmtree(self.root / f"step_{old}")

    def complete(self) -> list[tuple[int, Path]]:
        """(step, path) of every checkpoint whose save finished (it has a manifest), oldest first."""
        if not self.root.is_dir():
            return []
        return sorted(
            (int(m.group(1)), p)
            for p in self.root.iterdir()
            if (m := STEP_DIR.match(p.name)) and (p / MANIFEST).is_file()
        )

    def latest(self) -> Path | None:
        """The complete checkpoint with the highest step, if any."""
        found = self.complete()
        return found[-1][1] if found else None

    def resume_point(self, warn: Callable[[str], None]) -> Path | None:
        """The newest checkpoint that matches its manifest (``warn`` says which newer ones are damaged);
        retention will not delete it. Raises ``CheckpointError`` if every checkpoint is damaged."""
        damaged = []
        for step, path in reversed(self.complete()):
            why = problem(path)
            if why is None:
                if damaged:
                    warn(f"warning: {'; '.join(damaged)}; resuming from {path.name} instead")
                self.resumed_from = step
                return path
            damaged.append(f"checkpoint {path} is damaged: {why}")
        if damaged:
            raise CheckpointError(
                f"{'; '.join(damaged)}. No complete checkpoint to resume from: move them away to start over"
            )
        return None

    @staticmethod
    def load_weights(path: Path, model: DPOModel) -> None:
        """Restore the policy's weights, or its LoRA adapter, from ``path``'s ``model/``. Sharded by FSDP2:
        rank 0 reads them into CPU memory and every rank receives its shards; else every rank reads them."""
        policy = model.policy
        if isinstance(unwrap(model.policy_logprobs), FSDPModule):
            full = saved_policy_weights(path, policy) if model.dist.is_main else {}
            options = StateDictOptions(
                full_state_dict=True, broadcast_from_rank0=True, strict=not is_peft(policy)
            )
            set_model_state_dict(policy, full, options=options)
        elif is_peft(policy):
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(policy, load_file(path / "model" / "adapter_model.safetensors"))
        else:
            policy.load_state_dict(saved_policy_weights(path, policy))

    @staticmethod
    def load_training_state(
        path: Path, *, model: DPOModel, optimizer: torch.optim.Optimizer, scheduler: Any
    ) -> dict[str, Any]:
        """Restore optimizer (resharded to this run's ranks), scheduler and RNG; return the trainer state."""
        if (path / "optimizer").is_dir():  # absent: saved before any step was applied (a fresh optimizer)
            state = get_optimizer_state_dict(unwrap(model.policy_logprobs), optimizer)
            with one_process_dcp():
                dcp.load(state, checkpoint_id=path / "optimizer")
            set_optimizer_state_dict(unwrap(model.policy_logprobs), optimizer, state)
        scheduler.load_state_dict(load_plain(path / "scheduler.pt"))
        if not (path / "optimizer").is_dir():  # the learning rate is otherwise restored with the optimizer
            for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr(), strict=True):
                group["lr"] = lr
        set_rng_state(load_plain(path / "rng.pt"))
        return json.loads((path / STATE_FILE).read_text())


def saved_policy_weights(path: Path, policy: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The weights ``path``'s ``model/`` holds, in CPU memory, named as in ``policy``'s state dict: the whole
    model, or a LoRA policy's adapter (PEFT saves it under other names: each is matched to the policy's
    tensor PEFT's own renaming gives it)."""
    if not is_peft(policy):
        return AutoModelForCausalLM.from_pretrained(path / "model", dtype=policy.dtype).state_dict()
    from peft import get_peft_model_state_dict

    own = policy.state_dict()
    name_of = {id(tensor): name for name, tensor in own.items()}
    saved = load_file(path / "model" / "adapter_model.safetensors")
    renamed = get_peft_model_state_dict(policy, state_dict=own)
    return {name_of[id(tensor)]: saved[key] for key, tensor in renamed.items()}


FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)  # no space left on device, disk quota exceeded


def root_cause(error: BaseException | None) -> BaseException | None:
    """The failure under ``error``: the first ``OSError`` among DCP's per-rank failures and the exception
    chain, else the innermost failure (torch's zip writer reports a short write as a ``RuntimeError``)."""
    seen: list[BaseException] = []
    pending = [error] if error is not None else []
    while pending:
        current = pending.pop(0)
        if current is None or any(current is s for s in seen):
            continue
        if isinstance(current, OSError):
            return current
        seen.append(current)
        if isinstance(current, dcp.api.CheckpointException):
            pending += [exc for exc, _ in current.failures.values()]
        pending += [current.__cause__, current.__context__]
    return seen[-1] if seen else None


def describe(error: BaseException) -> str:
    """An exception in a few words: an ``OSError``'s reason, else its type and first line."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def load_plain(path: Path) -> Any:
    """``torch.load(weights_only=True)``: a file holding anything but tensors and plain values (a pickle
    that could run code) is refused, never executed."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path}: refused to load: it holds Python objects, not only tensors and plain values (was the "
            "checkpoint replaced or written by other software?); resume from a checkpoint you trust"
        ) from None
