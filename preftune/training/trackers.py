"""Experiment trackers: TensorBoard, Weights & Biases and MLflow see what ``metrics.jsonl`` holds.

Each tracker is optional, imported from its own library only when configured (``logger.*`` keys; extras
``preftune[tensorboard]``, ``[wandb]``, ``[mlflow]``). Only rank 0 opens them. ``output_dir/trackers.json``
keeps the W&B and MLflow run ids (a resumed run continues the same runs) and the last step sent, so a
resumed run sends no step twice: TensorBoard purges the steps after the checkpoint, W&B and MLflow skip the
steps the interrupted run had already sent (a resume reproduces them exactly).
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from omegaconf import DictConfig, OmegaConf

from preftune.config import PreftuneConfig
from preftune.errors import ConfigError
from preftune.run_dir import RunDir


class Tracker(Protocol):
    """One destination of the metrics. ``skip_through``: steps up to it are already there."""

    name: str
    skip_through: int

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None: ...

    def close(self) -> None: ...


@dataclass
class TrackerState:
    """``output_dir/trackers.json``: run ids to resume and the highest step sent to any tracker."""

    wandb_run_id: str | None = None
    mlflow_run_id: str | None = None
    last_step: int = -1

    @classmethod
    def load(cls, output_dir: Path) -> TrackerState:
        path = RunDir(output_dir).trackers
        return cls(**json.loads(path.read_text())) if path.is_file() else cls()

    def save(self, output_dir: Path) -> None:
        path = RunDir(output_dir).trackers
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self)) + "\n")
        os.replace(tmp, path)


def flat_config(cfg: PreftuneConfig) -> dict[str, Any]:
    """The resolved config as ``{"optim.lr": 5e-3, ...}``; lists become their JSON text."""

    def walk(node: Any, prefix: str) -> dict[str, Any]:
        if isinstance(node, dict):
            out: dict[str, Any] = {}
            for key, value in node.items():
                out.update(walk(value, f"{prefix}{key}."))
            return out
        if isinstance(node, list):
            return {prefix[:-1]: json.dumps(node)}
        return {prefix[:-1]: "null" if node is None else node}

    return walk(OmegaConf.to_container(cfg, resolve=True), "")


def samples_markdown(rows: list[dict[str, Any]]) -> str:
    """Sample generations as a Markdown table (TensorBoard and MLflow render it)."""

    def cell(text: Any) -> str:
        return str(text).replace("|", "\\|").replace("\n", "<br>")

    lines = ["| prompt | chosen (data) | generation | tokens |", "|---|---|---|---|"]
    lines += [
        f"| {cell(r['prompt'])} | {cell(r['chosen'])} | {cell(r['generation'])} | {r['num_tokens']} |"
        for r in rows
    ]
    return "\n".join(lines)


class TensorBoardTracker:
    """Event files in ``output_dir/tensorboard``; a resumed run purges the steps after its checkpoint."""

    name = "tensorboard"

    def __init__(self, log_dir: Path, cfg: PreftuneConfig, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        # events at and after purge_step, left by an interrupted attempt, are hidden by TensorBoard
        resumed = resume_step is not None
        self.skip_through = resume_step if resumed else -1
        self.writer = SummaryWriter(str(log_dir), purge_step=resume_step + 1 if resumed else 0)
        if not resumed:
            for summary in hparams(flat_config(cfg), {}):
                self.writer.file_writer.add_summary(summary)
            self.writer.add_text("config", "```\n" + OmegaConf.to_yaml(cfg, resolve=True) + "```", 0)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        self.writer.add_text("samples", samples_markdown(rows), step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run (``mode: offline`` needs no network); its id is kept so a resumed run continues it."""

    name = "wandb"

    def __init__(
        self, wcfg: DictConfig, output_dir: Path, cfg: PreftuneConfig, state: TrackerState, skip: int
    ):
        import wandb

        self.wandb = wandb
        fresh = state.wandb_run_id is None
        state.wandb_run_id = state.wandb_run_id or secrets.token_hex(4)
        self.skip_through = skip
        self.run = wandb.init(
            project=wcfg.project,
            entity=wcfg.entity,
            name=wcfg.name,
            tags=list(wcfg.tags) or None,
            mode=wcfg.mode,
            id=state.wandb_run_id,
            resume="allow",
            dir=str(RunDir(output_dir).wandb.parent),  # W&B writes into <dir>/wandb
            config=flat_config(cfg) if fresh else None,
            # the console stays the user's (W&B would otherwise wrap stdout and stderr)
            settings=wandb.Settings(console="off", silent=True),
        )

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        columns = ["step", "prompt", "chosen", "generation", "num_tokens"]
        table = self.wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])
        self.run.log({"samples": table}, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    """An MLflow run in ``experiment`` (a ``file:`` store needs no server); a resumed run continues it."""

    name = "mlflow"

    def __init__(self, mcfg: DictConfig, cfg: PreftuneConfig, state: TrackerState, skip: int):
        uri = str(mcfg.tracking_uri)
        if "://" not in uri or uri.startswith("file:"):
            # MLflow 3 asks for an opt-in to its file store; the user asked for one by naming it.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self.Metric = Metric
        self.client = MlflowClient(tracking_uri=uri)
        self.skip_through = skip
        if state.mlflow_run_id is None:
            experiment = self.client.get_experiment_by_name(mcfg.experiment)
            experiment_id = (
                experiment.experiment_id if experiment else self.client.create_experiment(mcfg.experiment)
            )
            run = self.client.create_run(experiment_id, run_name=mcfg.run_name)
            state.mlflow_run_id = run.info.run_id
            params = [Param(key, str(value)) for key, value in flat_config(cfg).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(state.mlflow_run_id, params=params[i : i + 100])
        else:
            self.client.update_run(state.mlflow_run_id, status="RUNNING")
        self.run_id = state.mlflow_run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(1000 * time.time())
        batch = [self.Metric(key, float(value), now, step) for key, value in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        self.client.log_text(self.run_id, samples_markdown(rows), f"samples/step_{step:07d}.md")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def open_trackers(
    cfg: PreftuneConfig, output_dir: Path, resume_step: int | None
) -> tuple[list[Tracker], TrackerState]:
    """The configured trackers, started (rank 0 only); a tracker that cannot start is a ``ConfigError``.
    ``resume_step``: the checkpoint's step when resuming (its records were all sent), None on a fresh start."""
    lcfg = cfg.logger
    state = TrackerState.load(output_dir)
    skip = max(-1 if resume_step is None else resume_step, state.last_step)
    openers = []
    if lcfg.tensorboard:
        openers.append(
            (
                "logger.tensorboard",
                "tensorboard",
                lambda: TensorBoardTracker(RunDir(output_dir).tensorboard, cfg, resume_step),
            )
        )
    if lcfg.wandb.project is not None:
        openers.append(
            ("logger.wandb", "wandb", lambda: WandbTracker(lcfg.wandb, output_dir, cfg, state, skip))
        )
    if lcfg.mlflow.tracking_uri is not None:
        openers.append(("logger.mlflow", "mlflow", lambda: MlflowTracker(lcfg.mlflow, cfg, state, skip)))
    trackers: list[Tracker] = []
    for key, extra, opener in openers:
        try:
            trackers.append(opener())
        except ImportError as e:
            raise ConfigError(
                f"{key} is set but {e.name} is not installed: pip install 'preftune[{extra}]'"
            ) from None
        except Exception as e:
            for tracker in trackers:
                tracker.close()
            message = " ".join(str(e).split())
            raise ConfigError(f"{key}: the tracker could not start: {type(e).__name__}: {message}") from None
    if trackers:
        state.save(output_dir)
    return trackers, state
