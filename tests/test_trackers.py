"""Trackers: the values each one stores, read back from its own files, equal ``metrics.jsonl``, also across
a resume after a lost checkpoint; a tracker that cannot start stops the run with one line, one that fails
mid-run is reported once and training goes on."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tensorboard")
pytest.importorskip("wandb")
pytest.importorskip("mlflow")

from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from preftune.cli import main
from preftune.config_checks import load_config
from preftune.run_dir import RunDir
from preftune.training.metrics import MetricsLogger
from preftune.training.trackers import MlflowTracker, TrackerState

from conftest import run

KEYS = ("train/loss", "train/acc", "train/lr", "train/grad_norm", "val/loss", "val/acc")


def jsonl_series(output_dir: Path) -> dict[str, dict[int, float]]:
    series: dict[str, dict[int, float]] = {}
    for line in (output_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        for key, value in rec.items():
            if "/" in key:
                assert rec["step"] not in series.setdefault(key, {}), f"{key} twice at step {rec['step']}"
                series[key][rec["step"]] = value
    return series


def tensorboard_series(log_dir: Path) -> dict[str, dict[int, float]]:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    series: dict[str, dict[int, float]] = {}
    for key in acc.Tags()["scalars"]:
        for event in acc.Scalars(key):
            assert event.step not in series.setdefault(key, {}), f"{key} twice at step {event.step}"
            series[key][event.step] = event.value
    return series


def wandb_records(output_dir: Path) -> list[dict]:
    """Every record of the run's offline ``.wandb`` files, oldest first, decoded by wandb's own reader."""
    out = []
    for path in sorted(output_dir.glob("wandb/offline-run-*/run-*.wandb")):
        text = subprocess.run(
            [str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--json", str(path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        out += [json.loads(line) for line in text.splitlines() if line.strip()]
    return out


def wandb_series(records: list[dict]) -> dict[str, dict[int, float]]:
    series: dict[str, dict[int, float]] = {}
    for rec in records:
        if rec["type"] != "history":
            continue
        step = rec["history"]["step"].get("num", 0)
        for key, value in rec["history"]["item"].items():
            if not key.startswith("_"):
                assert step not in series.setdefault(key, {}), f"{key} twice at step {step}"
                series[key][step] = value
    return series


def mlflow_series(client: MlflowClient, run_id: str) -> dict[str, dict[int, float]]:
    series: dict[str, dict[int, float]] = {}
    for key in KEYS:
        for metric in client.get_metric_history(run_id, key):
            assert metric.step not in series.setdefault(key, {}), f"{key} twice at step {metric.step}"
            series[key][metric.step] = metric.value
    return series


def assert_same(
    tracked: dict[str, dict[int, float]], expected: dict[str, dict[int, float]], name: str
) -> None:
    for key in KEYS:
        assert sorted(tracked[key]) == sorted(expected[key]), (name, key)
        for step, value in expected[key].items():
            assert tracked[key][step] == pytest.approx(value, rel=1e-6), (name, key, step)


@pytest.mark.slow
def test_trackers_hold_metrics_jsonl_across_a_resume(tmp_path, tiny_model_dir, pair_files, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-home"))
    store = f"file://{tmp_path / 'mlruns'}"
    common = (
        "logger.tensorboard=true",
        "logger.wandb.project=preftune-test",
        "logger.wandb.mode=offline",
        "logger.wandb.tags=[tiny,test]",
        f"logger.mlflow.tracking_uri={store}",
        "logger.mlflow.experiment=tiny",
        "trainer.val_check_interval=2",
        "trainer.save_interval=2",
        "optim.sched.max_steps=6",
    )
    model_dir = tiny_model_dir("llama")
    _, out = run(tmp_path, "run", model_dir, pair_files, "trainer.max_steps=4", *common)
    state = json.loads((out / "trackers.json").read_text())
    assert state["last_step"] == 4
    # The newest checkpoint lost (as if killed after step 4, before saving it): steps 3-4 are done again.
    shutil.rmtree(out / "checkpoints/step_4")
    run(tmp_path, "run", model_dir, pair_files, "trainer.max_steps=6", *common)
    assert json.loads((out / "trackers.json").read_text())["wandb_run_id"] == state["wandb_run_id"]

    expected = jsonl_series(out)
    assert sorted(expected["train/loss"]) == [1, 2, 3, 4, 5, 6]
    assert_same(tensorboard_series(out / "tensorboard"), expected, "tensorboard")

    records = wandb_records(out)
    assert_same(wandb_series(records), expected, "wandb")
    runs = [r["run"] for r in records if r["type"] == "run"]
    assert {r["run_id"] for r in runs} == {state["wandb_run_id"]} and len(runs) == 2  # one run, resumed
    assert runs[0]["config"]["update"]["optim.lr"] == 5e-3
    assert runs[0]["tags"] == ["tiny", "test"]

    client = MlflowClient(tracking_uri=store)
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert mlflow_run.info.run_id == state["mlflow_run_id"] and mlflow_run.info.status == "FINISHED"
    assert_same(mlflow_series(client, state["mlflow_run_id"]), expected, "mlflow")
    assert mlflow_run.data.params["dpo.ref_policy_kl_penalty"] == "0.1"

    layout = RunDir(out)  # every file the run wrote is one RunDir names
    named = [
        layout.config,
        layout.metrics,
        layout.trackers,
        layout.tensorboard,
        layout.wandb,
        layout.checkpoints,
        layout.cache,
    ]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in named)
    assert layout.tokenized().is_dir() and (layout.checkpoints / "step_6").is_dir()
    assert mlflow_run.data.params["trainer.max_steps"] == "4"  # the config of the run's first start


def test_tracker_that_cannot_start_stops_the_run_with_one_line(tmp_path, tiny_model_dir, pair_files, capsys):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    config = tmp_path / "run.yaml"
    cfg = {
        "model": {"path": str(tiny_model_dir("llama"))},
        "data": {"train": str(pair_files["train"]), "global_batch_size": 8},
        "output_dir": str(tmp_path / "out"),
        "trainer": {"max_steps": 2},
        "logger": {"mlflow": {"tracking_uri": f"file://{blocker}/mlruns"}},
    }
    config.write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    capsys.readouterr()  # the fixture's model saving
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("preftune: error: logger.mlflow: the tracker could not start")
    assert not (tmp_path / "out/metrics.jsonl").exists() and not (tmp_path / "out/checkpoints").exists()


def test_tracker_failing_mid_run_is_reported_once(tmp_path, capsys):
    cfg = load_config(
        None, ["model.path=m", "data.train=t", f"logger.mlflow.tracking_uri=file://{tmp_path}/mlruns"]
    )
    state = TrackerState()
    logger = MetricsLogger(tmp_path / "out")
    logger.attach([MlflowTracker(cfg.logger.mlflow, cfg, state, skip=0)], state)
    logger.log_metrics({"loss": 0.5}, 1, prefix="train")
    shutil.rmtree(tmp_path / "mlruns")  # the store disappears under the run
    for step in (2, 3, 4):
        logger.log_metrics({"loss": 0.5 / step, "acc": math.nan}, step, prefix="train")
    err = capsys.readouterr().err
    assert err.count("warning: mlflow failed at step 2") == 1 and err.count("warning") == 1
    lines = [json.loads(line) for line in (tmp_path / "out/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4] and lines[-1]["train/loss"] == 0.125
    assert lines[-1]["train/acc"] == "nan" and lines[-1]["timestamp"] > 1.7e9
