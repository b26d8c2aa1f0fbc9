"""``preftune eval``: a run's final checkpoint scores exactly the run's last validation; the base model
scores loss log 2 and accuracy 0 (policy == reference); a LoRA checkpoint is evaluated through its adapter."""

from __future__ import annotations

import json
import math

import pytest

from preftune.cli import main

from conftest import records, run

pytestmark = pytest.mark.slow

COMPARED = (
    "loss",
    "preference_loss",
    "acc",
    "reward_margin_mean",
    "logps_chosen_mean",
    "logps_rejected_mean",
)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_eval_of_final_checkpoint_equals_last_validation(lora, tmp_path, tiny_model_dir, pair_files, capsys):
    extra = ("model.lora.r=4",) if lora else ()
    _, out = run(tmp_path, "run", tiny_model_dir("llama"), pair_files, "trainer.max_steps=3", *extra)
    last = records(out, "val")[3]
    report = tmp_path / "eval.json"
    args = ["eval", "--config", str(out / "config.yaml"), "--checkpoint", str(out / "checkpoints/step_3")]
    assert main([*args, "--json", str(report)]) == 0
    metrics = json.loads(report.read_text())["metrics"]
    assert metrics["pairs"] == 16
    for key in COMPARED:
        assert metrics[key] == pytest.approx(last[f"val/{key}"], rel=1e-5, abs=1e-6), key
    assert "validation metrics of" in capsys.readouterr().out

    assert main(["eval", "--config", str(out / "config.yaml"), "--json", str(report)]) == 0
    base = json.loads(report.read_text())["metrics"]
    assert base["preference_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert base["loss"] == pytest.approx(math.log(2), abs=1e-6) and base["acc"] == 0.0
    assert base["reward_margin_mean"] == pytest.approx(0.0, abs=1e-6)
    assert base["loss"] == pytest.approx(records(out, "val")[0]["val/loss"], abs=1e-6)  # the step-0 baseline

    capsys.readouterr()
    assert main(["eval", "--config", str(out / "config.yaml"), "--checkpoint", str(out)]) == 2
    assert main(["eval", "--config", str(out / "config.yaml"), "data.validation=null"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("preftune: error: --checkpoint") and "not a checkpoint" in err[0]
    assert (
        err[1]
        == "preftune: error: no validation data: set data.validation=FILE (or data.validation_fraction)"
    )
