"""``preftune sweep``: the --grid spec, the shared tokenization and reference pass (counted), each trial equal to
a standalone run, a SIGKILLed sweep resumed to the same result, Optuna pruning, and a bad spec's one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import preftune.data.dataset as dataset_module
from preftune.cli import main
from preftune.config_checks import load_config
from preftune.errors import ConfigError
from preftune.modeling.reference import FrozenReference
from preftune.recipe import run_training
from preftune.sweep import SweepSpec, worker_command
from preftune.tools.sweep_space import Range, Values, grid_trials, parse_dimension, parse_space, split_values

from conftest import records

GRID = ["dpo.ref_policy_kl_penalty=0.1,0.5", "dpo.preference_loss=dpo,ipo"]


@pytest.fixture(scope="module")
def base_config(tmp_path_factory, tiny_model_dir, pair_files) -> Path:
    path = tmp_path_factory.mktemp("sweep-base") / "base.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            model: {{path: {tiny_model_dir("llama")}}}
            data: {{train: {pair_files["train"]}, validation: {pair_files["validation"]}, max_seq_length: 48,
                    micro_batch_size: 4, global_batch_size: 8}}
            optim: {{lr: 5.0e-3}}
            trainer: {{max_steps: 4, val_check_interval: 2, save_interval: 2}}
            """
        )
    )
    return path


def sweep(base: Path, out: Path, *args: str) -> int:
    return main(["sweep", "--config", str(base), "--output-dir", str(out), *args])


def load(out: Path) -> dict:
    return json.loads((out / "sweep.json").read_text())


# -- the spec: pure functions ------------------------------------------------------------------------


def test_spec_values_ranges_and_grid_order():
    assert split_values("0.1, [dpo,sft] ,ipo") == ["0.1", "[dpo,sft]", "ipo"]
    assert parse_dimension("optim.lr=log:1e-7:1e-5") == Range("optim.lr", 1e-7, 1e-5, log=True)
    assert parse_dimension("dpo.ref_policy_kl_penalty=0.01:1.0") == Range(
        "dpo.ref_policy_kl_penalty", 0.01, 1.0, False
    )
    assert parse_dimension("trainer.max_time=00:00:10:00") == Values("trainer.max_time", ("00:00:10:00",))
    space = parse_space(["a.x=1,2", "b.y=p,q,r"])
    assert grid_trials(space) == [
        {"a.x": x, "b.y": y} for x in ("1", "2") for y in ("p", "q", "r")
    ]  # the last key varies fastest, 2 x 3 trials


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("optim.lr", "expected KEY=V1,V2"),
        ("optim.lr=log:0:1e-5", "low end above 0"),
        ("optim.lr=1e-5:1e-7", "low end must be below"),
        ("optim.lr=log:a:1", "must be numbers"),
        ("dpo.preference_loss=dpo,,ipo", "empty value"),
        ("dpo.preference_loss=dpo,dpo", "listed twice"),
        ("output_dir=a,b", "--output-dir"),
    ],
)
def test_bad_items_are_refused(item, message):
    with pytest.raises(ConfigError, match=message):
        parse_space([item])


def test_a_range_is_not_a_grid():
    with pytest.raises(ConfigError, match="--search optuna"):
        grid_trials(parse_space(["optim.lr=log:1e-7:1e-5"]))


@pytest.mark.parametrize(
    ("grid", "expected"),
    [
        (["dpo.betaa=0.1,0.2"], ["unknown config key 'dpo.betaa'", "Did you mean"]),
        (["trainer.max_steps=2,two"], ["trainer.max_steps='two'", "expected an integer"]),
        (["optim.lr=1e-3:1e-4"], ["low end must be below its high end"]),
        (["optim.lr=log:1e-4:1e-2"], ["--search optuna"]),
        (["dpo.preference_loss=1:3", "--search", "optuna", "--trials", "2"], ["a range needs a number key"]),
    ],
)
def test_bad_grid_one_line_exit_2(base_config, tmp_path, capsys, grid, expected):
    assert sweep(base_config, tmp_path / "s", "--grid", *grid) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("preftune: error: "), lines
    for text in expected:
        assert text in lines[0]
    assert not (tmp_path / "s" / "trial_000").exists()  # refused before any trial started


# -- the trainer's hook -------------------------------------------------------------------------------


def test_should_stop_stops_the_run_after_a_validation(tmp_path, tiny_model_dir, pair_files):
    asked = []

    def should_stop(step: int, metrics: dict) -> bool:
        asked.append((step, metrics["loss"]))
        return step == 2

    cfg = load_config(
        None,
        [
            f"model.path={tiny_model_dir('llama')}",
            f"data.train={pair_files['train']}",
            f"data.validation={pair_files['validation']}",
            f"output_dir={tmp_path / 'run'}",
            "data.max_seq_length=48",
            "data.micro_batch_size=4",
            "trainer.max_steps=5",
            "trainer.val_check_interval=1",
            "trainer.save_interval=100",
        ],
    )
    result = run_training(cfg, should_stop)
    assert (result.finished, result.stopped_by_callback, result.steps) == (False, True, 2)
    val = records(tmp_path / "run", "val")
    assert asked == [(1, val[1]["val/loss"]), (2, val[2]["val/loss"])]  # not at step 0, the baseline
    assert sorted(records(tmp_path / "run", "train")) == [1, 2]
    assert (tmp_path / "run" / "checkpoints" / "step_2").is_dir()  # saved like a stop signal


# -- a 2 x 2 grid -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_grid_shares_tokenization_and_reference(base_config, tmp_path, monkeypatch, capsys):
    """Tokenized pairs and reference forwards over the whole sweep equal one pass over the data (not four),
    and every trial's losses equal a standalone `preftune train` of its config.yaml with caches of its own."""
    counts = {"tokenized": 0, "reference": 0}
    real_tokenize, real_logprobs = dataset_module.tokenize_sources, FrozenReference.logprobs

    def counting_tokenize(*args, **kwargs):
        out = real_tokenize(*args, **kwargs)
        counts["tokenized"] += len(out.origins) + len(out.drops)
        return out

    def counting_logprobs(self, batch):
        counts["reference"] += batch.num_pairs
        return real_logprobs(self, batch)

    monkeypatch.setattr(dataset_module, "tokenize_sources", counting_tokenize)
    monkeypatch.setattr(FrozenReference, "logprobs", counting_logprobs)
    out = tmp_path / "sweep"
    assert sweep(base_config, out, "--grid", *GRID) == 0
    assert "tokenizations: 1, reference passes: 1 for 4 trials" in capsys.readouterr().out
    result = load(out)
    pairs = 48 + 16  # the train and validation files (conftest.pair_files), none dropped
    assert counts == {"tokenized": pairs, "reference": pairs}
    assert (result["tokenizations"], result["reference_passes"]) == (1, 1)
    assert [r["params"] for r in result["trials"]] == [
        {"dpo.ref_policy_kl_penalty": b, "dpo.preference_loss": loss}
        for b in (0.1, 0.5)
        for loss in ("dpo", "ipo")
    ]
    assert all(r["state"] == "complete" and r["steps"] == 4 for r in result["trials"])
    best = min(result["trials"], key=lambda r: r["metric"])
    assert result["best"] == best["dir"] and (out / "best.yaml").is_file()
    assert (
        main(["report", str(out)]) == 0
    )  # the trials overlaid, labelled by their values, and metric vs keys
    page = (out / "report.html").read_text()
    assert "trial_003 ref_policy_kl_penalty=0.5 preference_loss=ipo" in page and "alt='sweep_metric'" in page

    for trial in result["trials"]:
        trial_dir = out / trial["dir"]
        alone = tmp_path / f"alone_{trial['dir']}"
        args = ["--config", str(trial_dir / "config.yaml"), f"output_dir={alone}"]
        assert main(["train", *args, "data.cache_dir=null", "reference.cache_dir=null"]) == 0
        for prefix in ("train", "val"):
            swept, standalone = records(trial_dir, prefix), records(alone, prefix)
            assert swept.keys() == standalone.keys() == ({1, 2, 3, 4} if prefix == "train" else {0, 2, 4})
            for step, rec in swept.items():
                assert rec[f"{prefix}/loss"] == pytest.approx(standalone[step][f"{prefix}/loss"], abs=1e-6)
        assert trial["metric"] == pytest.approx(standalone[4]["val/loss"], abs=1e-6)
    assert counts["reference"] == 5 * pairs  # each standalone run made its own reference pass


KILLER = """
import os, signal, sys
from preftune.training.checkpoint import Checkpointer
save = Checkpointer.save
def save_then_die(self, step, **kwargs):
    save(self, step, **kwargs)
    if self.root.parent.name == "trial_001" and step == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # mid-sweep: trial_001 has its step-2 checkpoint
Checkpointer.save = save_then_die
from preftune.cli import main
sys.exit(main(sys.argv[1:]))
"""


SEARCH = ["--search", "optuna", "--trials", "3", "--prune"]
OPTUNA = ["--grid", "optim.lr=log:1e-5:1e-1", "dpo.ref_policy_kl_penalty=0.05:1.0", *SEARCH]


def assert_pruned_search(out: Path) -> None:
    """Three trials numbered once each with distinct values in their ranges, at least one pruned: stopped
    early at a validation, and not the best."""
    result = load(out)
    trials = result["trials"]
    assert [t["trial"] for t in trials] == [0, 1, 2]
    assert len({json.dumps(t["params"], sort_keys=True) for t in trials}) == 3
    assert all(1e-5 <= t["params"]["optim.lr"] <= 1e-1 for t in trials)
    pruned = [t for t in trials if t["state"] == "pruned"]
    assert pruned and all(t["steps"] == 2 == max(records(out / t["dir"], "train")) for t in pruned)
    assert result["best"] not in {t["dir"] for t in pruned}


@pytest.mark.slow
@pytest.mark.parametrize("search", ["grid", "optuna"])
def test_sigkilled_sweep_resumes_to_the_same_result(base_config, tmp_path, capsys, search):
    """A sweep SIGKILLed just after trial_001 saved its step-2 checkpoint, rerun with the same command, ends
    with a straight sweep's sweep.json. The grid's trial_001 resumes from that checkpoint; the Optuna
    search's trial_001 had been pruned at that validation (its report reached the study), so it is recorded as
    pruned there without training again. The straight grid runs as --parallel 2's two worker commands (one
    trial each), then the plain command assembles their records."""
    args = ["--grid", "dpo.ref_policy_kl_penalty=0.1,0.5"] if search == "grid" else OPTUNA
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    if search == "grid":  # --parallel 2's two workers (run here one after the other), then the plain command
        spec = SweepSpec(str(base_config), args[1:], "grid", 0, "val/loss", prune=False)
        for index in range(2):
            worker = worker_command(spec, straight, False, f"{index}/2")
            assert worker[-2:] == ["--worker", f"{index}/2"] and "--parallel" not in worker
            assert main(worker) == 0
            assert not (straight / "sweep.json").exists()  # a worker writes its trials' records only
        assert len(list(straight.glob("trial_*/sweep_trial.json"))) == 2
        capsys.readouterr()
        assert sweep(base_config, straight, *args) == 0
        assert "trial 0:" not in capsys.readouterr().out  # nothing left to run: the summary only
    else:
        assert sweep(base_config, straight, *args) == 0
        assert_pruned_search(straight)
    command = ["sweep", "--config", str(base_config), "--output-dir", str(killed), *args]
    proc = subprocess.run([sys.executable, "-c", KILLER, *command], env=env, capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert json.loads((killed / "trial_001" / "sweep_trial.json").read_text())["state"] == "running"
    trial_000 = (killed / "trial_000" / "metrics.jsonl").read_text()
    capsys.readouterr()

    assert main(command) == 0  # the same command
    out = capsys.readouterr().out
    assert "trial 0:" not in out  # finished: skipped, not repeated
    assert (killed / "trial_000" / "metrics.jsonl").read_text() == trial_000
    if search == "grid":
        assert f"resuming from {killed / 'trial_001' / 'checkpoints' / 'step_2'}" in out
    else:
        assert "trial 1:" not in out and load(killed)["trials"][1]["state"] == "pruned"

    def comparable(root: Path) -> str:
        result = load(root)
        for trial in result["trials"]:
            trial.pop("wall_time_s")
        return json.dumps(result).replace(str(root), "DIR")

    assert comparable(killed) == comparable(straight)


def test_parallel_needs_gpus(base_config, tmp_path, capsys):
    assert sweep(base_config, tmp_path / "p", "--grid", "optim.lr=1e-3,1e-2", "--parallel", "2") == 2
    assert "--parallel 2 runs trials side by side on 2 GPU groups" in capsys.readouterr().err
