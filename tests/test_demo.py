"""The demo's learning, from the real run: held-out pair accuracy 0 at step 0, at least 0.90 at the end."""

from __future__ import annotations

import json

import pytest

from preftune.cli import main

pytestmark = pytest.mark.slow


def test_demo_learns_the_rule(tmp_path, capsys):
    assert main(["demo", "--output-dir", str(tmp_path), "trainer.val_check_interval=1000"]) == 0
    out = capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/acc" in r]
    val = [r for r in records if "val/acc" in r]
    assert train[0]["step"] == 1 and train[0]["train/acc"] == 0.0
    assert train[0]["train/preference_loss"] == pytest.approx(0.693147, abs=1e-5)  # policy == reference
    assert [r["step"] for r in val] == [0, train[-1]["step"]], "validation ran at step 0 and at the end"
    assert val[0]["val/acc"] == 0.0 and val[0]["val/preference_loss"] == pytest.approx(0.693147, abs=1e-5)
    assert val[-1]["val/acc"] >= 0.90
    assert f"held-out pairs: acc {val[-1]['val/acc']:.3f}" in out
    assert (tmp_path / f"run/checkpoints/step_{val[-1]['step']}/model/model.safetensors").is_file()
    # judged by the rule against the step-0 model: a tie everywhere at step 0, the figures said at the end
    assert val[0]["val/win_rate"] == 0.5 and val[0]["val/length_ratio"] == 1.0
    assert (
        f"win rate {val[-1]['val/win_rate']:.3f}, length-controlled {val[-1]['val/lc_win_rate']:.3f}" in out
    )
