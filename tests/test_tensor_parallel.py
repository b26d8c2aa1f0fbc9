"""Tensor parallelism (``distributed.tensor_parallel``) on CPU with gloo.

``tests/tensor_parallel_checks.py``, run in test_distributed.py's two-process launch, splits tiny models over both ranks and compares
each with the same model unsharded in the same process: the vocabulary-parallel log-probs (values and
gradients), every supported family's per-sequence log-probs, and for a full fine-tune and for LoRA the
log-probs, loss, metrics, every gradient and 3 AdamW steps of weights. Mis-specified meshes are refused in one
line before any weight loads. The runs through the recipe (TP=2, LoRA, resume across layouts, FSDP2 x TP on 4
processes) are in tests/test_distributed.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_distributed import free_port

from preftune.cli import main
from preftune.modeling.tensor_parallel import TENSOR_PARALLEL_FAMILIES

from conftest import built_once

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def checks(two_process_runs) -> dict:
    """The largest differences the 2-process launch measured (tests/tensor_parallel_checks.py, run in
    test_distributed.py's launch before its training runs)."""
    return json.loads((two_process_runs / "tensor-parallel-checks.json").read_text())


def test_vocab_parallel_logprobs_equal_one_process(checks):
    """A head split over the vocabulary (uneven shards, 3 chunks; with and without soft-capping): the values
    and the hidden states', weight's and bias's gradients of the one-process function, each rank's weight
    gradient only its shard."""
    found = checks["vocab_parallel"]
    assert len(found) == 10
    for key, value in found.items():
        assert value is True if key.endswith("is a shard") else value <= 1e-6, (key, value)


def test_every_supported_family_equals_one_process(checks):
    found = checks["families"]
    for model_type in TENSOR_PARALLEL_FAMILIES:
        assert found[model_type] <= 1e-6, model_type  # relative to the largest |log-prob| (~90)
        assert found[f"{model_type} tied kept"] is True, model_type
    assert any(found[f"{t} tied"] for t in TENSOR_PARALLEL_FAMILIES), "no family ties its embeddings"
    assert found["llama packed+shared"] <= 1e-6


def test_uneven_vocabulary_shards_and_tied_embeddings(checks):
    found = checks["uneven_tied_vocabulary"]
    assert found["logps"] <= 1e-6 and found["grads"] <= 1e-5 and found["tied kept"] is True, found


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_training_steps_equal_one_process(kind, checks):
    """TP=2 then FSDP2 (DPOModel.distribute) against one process: 3 steps of DPO (+SFT) on different pairs."""
    found = checks[kind]
    for key in ("logps", "loss", "metrics", "grads", "weights"):
        assert found[key] <= 1e-5, (kind, key, found[key])
    assert found["last loss"] > 0.1  # the steps moved the weights: the comparison is not of zeros


def test_weights_load_from_rank0(checks):
    """FSDP2 over several ranks: rank 1 builds the policy and its frozen reference on the meta device (no
    weights read) and receives from rank 0 only its shards, each equal to its slice of the one-process weight;
    the rotary buffers (computed, not saved) and the generators come out as rank 0's, tied embeddings tied."""
    found = checks["from_rank0"]
    assert found["rank1 meta before"] is True and found["rank0 meta before"] is False
    assert found["rank0 reference shares the policy's memory"] is True  # one copy of the weights on rank 0
    for rank in ("rank0", "rank1"):
        assert found[f"{rank} shards"] == 0.0 and found[f"{rank} computed buffers"] == 0.0, found
        assert found[f"{rank} local fraction"] < 0.55 and found[f"{rank} tied kept"] is True, found
        assert found[f"{rank} buffers counted"] >= 2  # inv_freq and original_inv_freq
    assert found["rank0 rng"] == found["rank1 rng"]


def launch_in_process(monkeypatch, capsys, world: int, config: Path, *overrides: str) -> tuple[int, str]:
    """``preftune train --config CONFIG OVERRIDES`` in this process as rank 0 of ``world`` (the launcher's
    variables set, no other rank): (exit status, stderr). Reaching the process group fails the test: the
    refusal must come before it, and before any weight loads."""
    for name, value in {"WORLD_SIZE": world, "RANK": 0, "LOCAL_RANK": 0, "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": free_port()}.items():  # fmt: skip
        monkeypatch.setenv(name, str(value))

    def unreachable(*args, **kwargs):
        raise AssertionError("the run got as far as the process group")

    monkeypatch.setattr("preftune.recipe.init_distributed", unreachable)
    capsys.readouterr()
    status = main(["train", "--config", str(config), *overrides])
    return status, capsys.readouterr().err


@pytest.fixture(scope="session")
def phi3_dir(tmp_path_factory, tokenizer) -> Path:
    from test_families import saved_family

    return built_once(tmp_path_factory, "tiny-phi3", lambda path: saved_family("phi3", tokenizer, path))


@pytest.mark.parametrize(
    "world, overrides, says",
    [
        (3, ("distributed.tensor_parallel=2",), "does not divide the 3 rank(s) launched"),
        (
            3,
            ("distributed.tensor_parallel=3",),
            "num_attention_heads=4 does not split over distributed.tensor_parallel=3",
        ),
        (
            2,
            ("distributed.tensor_parallel=2", "distributed.strategy=ddp"),
            "needs distributed.strategy=fsdp2",
        ),
        (
            2,
            ("distributed.tensor_parallel=2", "model.path=PHI3"),
            "model_type phi3 has no tensor-parallel plan",
        ),
        (2, ("distributed.tensor_parallel=2", "reference.path=PHI3"), "reference.path="),
        (
            2,
            ("distributed.tensor_parallel=2", "model.lora.r=4", "model.lora.use_dora=true"),
            "model.lora.use_dora",
        ),
        (2, ("distributed.tensor_parallel=2", "model.compile=true"), "model.compile=true with"),
    ],
    ids=["world", "heads", "ddp", "family", "reference-family", "dora", "compile"],
)
def test_mis_specified_mesh_is_one_line(world, overrides, says, monkeypatch, capsys, tmp_path, tiny_model_dir,
                                        pair_files, phi3_dir):  # fmt: skip
    overrides = [o.replace("PHI3", str(phi3_dir)) for o in overrides]
    args = [f"model.path={tiny_model_dir('llama')}", f"data.train={pair_files['train']}", f"output_dir={tmp_path / 'run'}",
            "distributed.strategy=fsdp2", "data.global_batch_size=12", *overrides]  # fmt: skip
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    status, err = launch_in_process(monkeypatch, capsys, world, config, *args)
    assert status == 2 and says in err and len(err.strip().splitlines()) == 1, err
