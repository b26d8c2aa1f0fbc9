"""A user's mistake ends with one line on stderr and exit status 2, before any model or data is loaded, in
``train`` and ``inspect`` alike, and under torchrun is reported once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from test_distributed import torchrun
from transformers import AutoConfig, AutoModelForCausalLM

from preftune.cli import main
from preftune.config_checks import load_config
from preftune.errors import ConfigError

OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def base_args(model_dir: Path, pair_files: dict, output_dir: Path) -> list[str]:
    return [
        f"model.path={model_dir}",
        f"data.train={pair_files['train']}",
        f"output_dir={output_dir}",
        "data.max_seq_length=48",
        "data.micro_batch_size=4",
        "data.global_batch_size=8",
    ]


def assert_one_line(stderr: str, *expected: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("preftune: error: ") and "Traceback" not in stderr
    for text in expected:
        assert text in lines[0], lines[0]


@pytest.fixture
def empty_config(tmp_path) -> Path:
    path = tmp_path / "empty.yaml"
    path.write_text("{}\n")
    return path


@pytest.fixture
def bidirectional_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny model packing cannot lay out (Gemma 3 with bidirectional attention)."""
    path = tmp_path_factory.mktemp("bidirectional")
    config = AutoConfig.for_model(
        "gemma3_text",
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        intermediate_size=32,
        use_bidirectional_attention=True,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def mistakes(
    tmp_path: Path, model_dir: Path, bidirectional_dir: Path
) -> dict[str, tuple[list[str], tuple[str, ...]]]:
    """override(s) -> what the one line must say."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    no_model = tmp_path / "no_model"
    no_model.mkdir()
    return {
        "lr-not-a-number": (["optim.lr=abc"], ("override 'optim.lr=abc'", "optim.lr", "a number")),
        "max-steps-word": (["trainer.max_steps=two"], ("trainer.max_steps", "an integer")),
        "train-null": (["data.train=null"], ("data.train cannot be null",)),
        "section-scalar": (["model=abc"], ("'model' is a section",)),
        "sft-as-loss": (["dpo.preference_loss=[dpo, sft]"], ("dpo.sft_loss_weight",)),
        "output-dir-file": ([f"output_dir={a_file}"], ("output_dir=", "is a file")),
        "output-dir-under-file": ([f"output_dir={a_file}/run"], ("cannot be written",)),
        "model-missing": ([f"model.path={tmp_path}/absent"], ("does not exist",)),
        "model-empty-dir": ([f"model.path={no_model}"], ("holds no model", "config.json")),
        "model-not-on-hub": (["model.path=no-such-org/no-such-model"], ("not a local directory",)),
        "packing-family": (
            [f"model.path={bidirectional_dir}", "data.packing=true"],
            ("gemma3_text model is bidirectional", "data.packing=false"),
        ),
        "compile-varlen": (["data.packing=true", "model.compile=true"], ("model.compile",)),
        "pack-length": (["data.packing=true", "data.pack_length=50"], ("data.pack_length=50",)),
        "optim-name": (["optim.name=sgd"], ("optim.name='sgd'", "adamw")),
        "router-scope": (
            ["model.router_aux_loss_scope=batch"],
            ("model.router_aux_loss_scope='batch'", "global_batch, micro_batch"),
        ),
        "robust-smoothing": (["dpo.preference_loss=robust", "dpo.label_smoothing=0.5"], ("label_smoothing",)),
        "batch-divisibility": (["data.global_batch_size=6"], ("data.global_batch_size (6)", "multiple of 4")),
        "too-few-pairs": (
            ["data.global_batch_size=400", "data.micro_batch_size=4"],
            ("fewer than one global",),
        ),
    }


@pytest.mark.slow
@pytest.mark.parametrize("command", ["train", "inspect"])
def test_every_mistake_is_one_line_and_exit_2(
    command, tmp_path, tiny_model_dir, pair_files, bidirectional_dir, empty_config, capsys, monkeypatch
):
    """``preftune.cli.main`` (what ``python -m preftune`` runs) on each mistake; no model is loaded."""
    import huggingface_hub
    import transformers

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: set it here

    def no_model_loads(*args, **kwargs):
        raise AssertionError("a model was loaded before the mistake was reported")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model_loads)
    base = base_args(tiny_model_dir("llama"), pair_files, tmp_path / "out")
    cases = mistakes(tmp_path, tiny_model_dir("llama"), bidirectional_dir)
    capsys.readouterr()  # what building the fixtures' models printed
    for name, (overrides, expected) in cases.items():
        if command == "inspect" and name in ("too-few-pairs", "model-empty-dir"):
            continue  # inspect reports the data (it does not train) and needs only a tokenizer
        code = main([command, "--config", str(empty_config), *base, *overrides])
        captured = capsys.readouterr()
        assert code == 2, (name, captured.err)
        assert_one_line(captured.err, *expected)


@pytest.mark.slow
def test_real_cli_subprocess(tmp_path, tiny_model_dir, pair_files, bidirectional_dir, empty_config):
    base = base_args(tiny_model_dir("llama"), pair_files, tmp_path / "out")
    # inspect here; train runs as a real subprocess in test_torchrun_* and test_stop_and_resume
    cmd = [sys.executable, "-m", "preftune", "inspect", "--config", str(empty_config), *base]
    done = subprocess.run(
        [*cmd, f"model.path={bidirectional_dir}", "data.share_prompt=true", "optim.lr=1e-5"],
        capture_output=True,
        text=True,
        timeout=300,
        env=OFFLINE,
    )
    assert done.returncode == 2
    assert_one_line(done.stderr, "gemma3_text model is bidirectional")
    assert done.stdout == ""  # nothing was loaded or logged before the line


def test_types_follow_the_defaults():
    ok = load_config(None, ["model.path=m", "data.train=[a, b]", "optim.lr=1", "trainer.max_time=3600"])
    assert ok.optim.lr == 1 and list(ok.data.train) == ["a", "b"]
    with pytest.raises(ConfigError, match=r"data.packing=1: expected true or false"):
        load_config(None, ["model.path=m", "data.train=t", "data.packing=1"])
    with pytest.raises(ConfigError, match=r"trainer.max_steps=2.5: expected an integer"):
        load_config(None, ["model.path=m", "data.train=t", "trainer.max_steps=2.5"])


def test_yaml_file_mistake_names_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    OmegaConf.save({"model": {"path": "m"}, "data": {"train": "t"}, "optim": {"lr": "fast"}}, path)
    with pytest.raises(ConfigError, match=rf"^{path}: optim.lr='fast': expected a number$"):
        load_config(path)


@pytest.mark.slow
def test_torchrun_reports_a_mistake_once(tmp_path, tiny_model_dir, pair_files, empty_config):
    """Two CPU ranks, a data file that does not exist (found after the process group is up): one line, by
    rank 0, which torchrun's report names as the root cause; no rank's traceback."""
    base = base_args(tiny_model_dir("llama"), pair_files, tmp_path / "out")
    done = subprocess.run(
        torchrun(2, "train", "--config", str(empty_config), *base, f"data.train={tmp_path}/no.jsonl"),
        capture_output=True,
        text=True,
        timeout=300,
        env=OFFLINE,
    )
    line = f"preftune: error: data.train: data file not found: {tmp_path}/no.jsonl"
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert [x for x in output.splitlines() if x.startswith("preftune: error")] == [line]
    assert "[rank" not in output and "DataError" not in output and "gloo" not in output.lower()
    assert f"traceback : {line}" in output  # torchrun's root cause is the line, not a traceback
