"""``preftune report``: two short runs with different configs give one page holding every curve image,
the config-difference table (exactly the keys set differently), final metrics and the latest samples."""

from __future__ import annotations

import base64
import re

import pytest

from preftune.cli import main
from preftune.tools.report import PANELS

from conftest import records, run

pytestmark = pytest.mark.slow


def test_report_of_two_runs(tmp_path, tiny_model_dir, pair_files, capsys):
    model_dir = tiny_model_dir("llama")
    common = (
        "trainer.max_steps=3",
        "trainer.val_check_interval=2",
        "trainer.samples.num_prompts=2",
        "trainer.samples.max_new_tokens=4",
    )
    _, a = run(tmp_path, "a", model_dir, pair_files, *common)
    _, b = run(tmp_path, "b", model_dir, pair_files, *common, "optim.lr=1e-3", "dpo.sft_loss_weight=0.5")
    page = tmp_path / "out/report.html"
    assert main(["report", str(a), str(b), "--output", str(page)]) == 0
    assert f"report: {page}" in capsys.readouterr().out
    text = page.read_text()

    images = re.findall(r"src='data:image/png;base64,([^']+)'", text)
    pngs = sorted((tmp_path / "out/report_png").glob("*.png"))
    assert len(images) == len(pngs) == len(PANELS)  # every panel has data in these runs
    assert sorted(base64.b64decode(i) for i in images) == sorted(p.read_bytes() for p in pngs)
    assert "http" not in text.replace("http-equiv", "")  # nothing fetched: opens offline

    diff = text.split("Config keys that differ")[1].split("<h2>")[0]
    keys = re.findall(r"<tr><td>([a-z_.]+)</td>", diff)
    assert keys == ["dpo.sft_loss_weight", "optim.lr"]
    assert "<td>0.005</td><td>0.001</td>" in diff
    final = text.split("Final validation metrics")[1].split("<h2>")[0]
    last_val = records(b, "val")[3]
    assert f"<td>{last_val['val/loss']:.4g}</td>" in final and "<td>b</td><td>3</td>" in final
    samples = text.split("Latest samples")[1]
    assert "a, step 3" in samples and "b, step 3" in samples and samples.count("<tr><td>") == 4


def test_labels_booleans_and_cut_characters(tmp_path):
    """Read at a glance: runs named by their paths below the common parent (one run: with its parent's name,
    never a bare "run"), YAML's true/false/null in the config table, a generation cut inside a multi-byte
    character shown without the broken tail."""
    from preftune.tools.report import Run, render_html, run_labels

    dirs = [tmp_path / "sweep/lr1/run", tmp_path / "sweep/lr2/run", tmp_path / "base"]
    runs = [Run("run", [], {"data.packing": v, "model.autocast": None}) for v in (True, False, True)]
    run_labels(runs, dirs)
    assert [r.name for r in runs] == ["sweep/lr1/run", "sweep/lr2/run", "base"]
    single = [Run("run", [], {})]
    run_labels(single, [tmp_path / "demo/run"])
    assert single[0].name == "demo/run"

    runs[0].samples = [
        {"step": 3, "prompt": "p", "chosen": "c", "generation": "red, purple\ufffd", "num_tokens": 4}
    ]
    page = render_html(runs, {}, {})
    diff = page.split("Config keys that differ")[1].split("<h2>")[0]
    assert "<tr><td>data.packing</td><td>true</td><td>false</td><td>true</td></tr>" in diff
    assert "True" not in page and "False" not in page
    assert "<td>red, purple</td>" in page and "\ufffd" not in page
