"""Ctrl-C at a terminal, re-running a finished run, resuming with a changed schedule, and paths that still
work from another directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from preftune.cli import main
from preftune.config_checks import load_config
from preftune.recipe import train

from conftest import records, run

pytestmark = pytest.mark.slow  # real training runs

EXIT_STOPPED, EXIT_INTERRUPTED = 75, 130


def start_training(tmp_path: Path, model_dir: Path, files: dict) -> subprocess.Popen:
    """``python -m preftune train`` for far more steps than the test waits, once it has begun training."""
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    args = [
        f"model.path={model_dir}",
        f"data.train={files['train']}",
        f"data.validation={files['validation']}",
        f"output_dir={tmp_path / 'run'}",
        "data.max_seq_length=48",
        "data.micro_batch_size=4",
        "data.global_batch_size=8",
        "trainer.max_steps=100000",
        "trainer.max_epochs=null",
        "trainer.save_interval=100000",
        "trainer.val_check_interval=100000",
    ]
    process = subprocess.Popen(
        [sys.executable, "-m", "preftune", "train", "--config", str(config), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    wait_for(process, "[preftune] training for")
    return process


def wait_for(process: subprocess.Popen, text: str) -> str:
    seen = ""
    while text not in seen:
        line = process.stdout.readline()
        assert line, f"the process ended before printing {text!r}:\n{seen[-3000:]}"
        seen += line
    return seen


def test_first_ctrl_c_validates_saves_and_stops(tmp_path, tiny_model_dir, pair_files):
    process = start_training(tmp_path, tiny_model_dir("llama"), pair_files)
    time.sleep(1)  # a few steps (or none: the first step then finishes before the run stops)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == EXIT_STOPPED, output[-3000:]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
    assert "interrupted: validating, saving and stopping after this step" in output
    out = tmp_path / "run"
    steps = sorted(records(out, "train"))
    last = steps[-1]
    assert steps == list(range(1, last + 1)) and last < 100000
    assert sorted(records(out, "val")) == [0, last]  # the baseline, and at the step it stopped
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step_{last}"]
    state = json.loads((out / f"checkpoints/step_{last}/trainer_state.json").read_text())
    assert state["step"] == last
    assert f"stopped early at step {last} of 100000" in output


def test_second_ctrl_c_stops_at_once(tmp_path, tiny_model_dir, pair_files):
    process = start_training(tmp_path, tiny_model_dir("llama"), pair_files)
    time.sleep(1)  # inside the training loop (the log line comes just before it)
    process.send_signal(signal.SIGINT)
    wait_for(process, "interrupted: validating")
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == EXIT_INTERRUPTED, output[-3000:]
    assert "interrupted again: stopped at once, without saving" in output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
    assert not (tmp_path / "run/checkpoints").exists()


def test_finished_run_does_nothing_and_schedule_change_is_told(tmp_path, tiny_model_dir, pair_files, capsys):
    model_dir = tiny_model_dir("llama")
    no_val = ("trainer.max_steps=2", "data.validation=null")
    _, out = run(tmp_path, "r", model_dir, pair_files, *no_val)
    first = capsys.readouterr().out
    assert first.count("no validation data") == 1 and "val loss" not in first
    metrics = (out / "metrics.jsonl").read_bytes()
    saved = (out / "checkpoints/step_2/trainer_state.json").stat().st_mtime_ns

    _, out = run(tmp_path, "r", model_dir, pair_files, *no_val)
    again = capsys.readouterr().out
    assert "already finished" in again and "training for" not in again
    assert (out / "metrics.jsonl").read_bytes() == metrics
    assert (out / "checkpoints/step_2/trainer_state.json").stat().st_mtime_ns == saved

    # Longer, with a higher peak: the cosine (warmup 2) now ends at step 4 and peaks at 1e-2.
    _, out = run(tmp_path, "r", model_dir, pair_files, *no_val, "trainer.max_steps=4", "optim.lr=1e-2")
    told = capsys.readouterr().out
    assert "changed learning-rate schedule (schedule length 2 -> 4, lr 0.005 -> 0.01)" in told
    lrs = {step: rec["train/lr"] for step, rec in records(out, "train").items()}
    # step 3 runs at multiplier 1 (cosine progress 0), step 4 at 0.5 (progress 1/2): of the new peak
    assert lrs[3] == pytest.approx(1e-2) and lrs[4] == pytest.approx(5e-3)


def test_relative_paths_are_saved_absolute_and_export_works_elsewhere(
    tmp_path, tiny_model_dir, pair_files, monkeypatch, capsys
):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(work)
    model_dir = Path(os.path.relpath(tiny_model_dir("llama"), work))
    cfg = load_config(
        None,
        [
            f"model.path={model_dir}",
            f"data.train={os.path.relpath(pair_files['train'], work)}",
            "data.validation=null",
            "output_dir=run",
            "data.max_seq_length=48",
            "data.micro_batch_size=4",
            "data.global_batch_size=8",
            "trainer.max_steps=1",
            "model.lora.r=4",
        ],
    )
    train(cfg)
    saved = OmegaConf.load(work / "run/config.yaml")
    assert Path(saved.model.path).is_absolute() and Path(saved.data.train).is_absolute()
    assert Path(saved.output_dir) == work / "run"
    adapter = json.loads((work / "run/checkpoints/step_1/model/adapter_config.json").read_text())
    assert Path(adapter["base_model_name_or_path"]) == tiny_model_dir("llama").resolve()
    monkeypatch.chdir(elsewhere)
    status = main(
        ["export", "--checkpoint", str(work / "run/checkpoints/step_1"), "--output", "merged", "--merge"]
    )
    assert status == 0, capsys.readouterr().err
    assert (elsewhere / "merged/model.safetensors").is_file()
