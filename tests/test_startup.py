"""The CLI answers at once: ``--help``, ``presets`` and a config mistake import neither torch nor
transformers; a training process imports only what its config uses (README "Start-up"). Each check runs in
a fresh interpreter: this one has imported everything already."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

import preftune

HEAVY = ("torch", "transformers", "peft", "bitsandbytes")
OPTIONAL = ("peft", "bitsandbytes", "datasets", "matplotlib", "wandb", "mlflow", "tensorboard", "optuna")

# Runs each argv (a JSON list) through preftune.cli.main, then prints the exit codes and which of the
# modules named in argv[2] the process has imported, as one JSON line.
RUN_AND_LIST_MODULES = """
import json, sys
from preftune.cli import main
codes = [main(argv) for argv in json.loads(sys.argv[1])]
print(json.dumps({"codes": codes, "loaded": [m for m in json.loads(sys.argv[2]) if m in sys.modules]}))
"""


def run_in_fresh_python(argvs: list[list[str]], modules: tuple[str, ...]) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", RUN_AND_LIST_MODULES, json.dumps(argvs), json.dumps(modules)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_help_answers_within_seconds():
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "preftune", "--help"], capture_output=True, text=True, timeout=60
    )
    elapsed = time.monotonic() - start
    assert done.returncode == 0 and "presets" in done.stdout
    assert elapsed < 5, f"preftune --help took {elapsed:.1f} s (about 0.3 s on an idle machine)"


def test_presets_and_config_mistakes_import_no_torch(tmp_path):
    argvs = [
        ["presets"],
        ["train", "--config", "preset:llama3.1-8b-full", "optim.lrr=1"],  # an unknown key
        ["inspect", "--config", "preset:qwen3-8b-lora", "optim.lr=fast"],  # a wrong type
        ["eval", "--config", str(tmp_path / "missing.yaml")],  # no such file
        # a rule on values (checked before any file or model is looked at)
        [
            "train",
            "--config",
            "preset:llama3.1-8b-full",
            "model.path=m",
            "data.train=t",
            "trainer.max_steps=0",
        ],
    ]
    assert run_in_fresh_python(argvs, HEAVY) == {"codes": [0, 2, 2, 2, 2], "loaded": []}


def test_public_names_load_on_first_use():
    assert sorted(preftune.__all__) == sorted(preftune._PUBLIC)
    for name in preftune.__all__:
        assert getattr(preftune, name).__name__.rpartition(".")[2] == name
    with pytest.raises(AttributeError, match="no attribute 'DPOTrainr'"):
        preftune.DPOTrainr  # noqa: B018


@pytest.mark.slow
def test_full_finetune_imports_no_optional_library(tmp_path, tiny_model_dir, pair_files):
    """One step of a full fine-tune without trackers: torch and transformers, none of the optional
    libraries (peft without LoRA, bitsandbytes without 4-bit, no tracker, datasets or matplotlib)."""
    argv = [
        "train",
        "--config",
        str(write_config(tmp_path, tiny_model_dir("llama"), pair_files)),
        "trainer.max_steps=1",
    ]
    result = run_in_fresh_python([argv], ("torch", "transformers", *OPTIONAL))
    assert result == {"codes": [0], "loaded": ["torch", "transformers"]}
    assert (tmp_path / "run/checkpoints/step_1/model/model.safetensors").is_file()


def write_config(tmp_path, model_dir, files):
    path = tmp_path / "run.yaml"
    path.write_text(
        f"model: {{path: {model_dir}}}\noutput_dir: {tmp_path / 'run'}\n"
        f"data: {{train: {files['train']}, validation: {files['validation']}, max_seq_length: 48, "
        "micro_batch_size: 4, global_batch_size: 8}\n"
    )
    return path
