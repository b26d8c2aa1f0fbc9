"""torchrun on CPU (gloo, 2 processes): DDP and FSDP2 give what one process gives, and so does tensor
parallelism (FSDP2 over a mesh, plain and LoRA; 4 processes: 2 data-parallel x 2 tensor-parallel); checkpoints
reshard across those layouts."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from preftune.cli import main

from conftest import built_once, copy_run, run

pytestmark = pytest.mark.slow

STEPS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *preftune_args: str) -> list[str]:
    """``torchrun --nproc-per-node=N -m preftune ARGS`` on a free port, with this Python."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        f"--master-port={free_port()}",
        "-m",
        "preftune",
        *preftune_args,
    ]


def train_args(output_dir: Path, model_dir: Path, files: dict, *overrides: str) -> list[str]:
    """The overrides of the runs below: the tiny model, STEPS of the pair files' data."""
    return [
        f"model.path={model_dir}",
        f"data.train={files['train']}",
        f"data.validation={files['validation']}",
        f"output_dir={output_dir}",
        "data.max_seq_length=48",
        "data.micro_batch_size=2",
        "data.global_batch_size=8",
        "optim.lr=5e-3",
        # Adam's eps well above float32 gradient noise (~2e-8 here): with the default 1e-8 the first step is
        # lr * sign(g), blind to the gradient's scale, and a weight whose gradient is ~1e-8 moves by up to
        # ~3e-5 on reduction-order noise alone; at 1e-4 the weights check the gradients' values to ~1e-7.
        "optim.eps=1e-4",
        f"optim.sched.max_steps={STEPS}",
        "trainer.val_check_interval=100",
        *overrides,
    ]


def launch(tmp_path: Path, name: str, nproc: int, model_dir: Path, files: dict, *overrides: str) -> Path:
    output_dir = tmp_path / name
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    args = train_args(output_dir, model_dir, files, *overrides)
    if nproc == 1:  # the CLI in this process: only the 2-process runs need torchrun
        assert main(["train", "--config", str(config), *args]) == 0
        return output_dir
    cmd = torchrun(nproc, "train", "--config", str(config), *args)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return output_dir


def train_records(output_dir: Path) -> dict[int, dict]:
    recs = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in recs if "train/loss" in r}


def final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    """The last checkpoint's weights (a LoRA run's: its adapter's)."""
    model = output_dir / f"checkpoints/step_{STEPS}/model"
    return load_file(
        model
        / ("adapter_model.safetensors" if (model / "adapter_config.json").is_file() else "model.safetensors")
    )


# what the data- and context-parallel runs must log as one process does; not the summed log-probs (means of
# about -150, where float32's resolution is 1.5e-5)
STEP_KEYS = (
    "train/loss",
    "train/acc",
    "train/preference_loss",
    "train/rewards_chosen_mean",
    "train/grad_norm",
)


def assert_same_run(single: Path, multi: Path, keys: tuple[str, ...], label: str) -> None:
    """Every step's ``keys`` and the final weights of the two runs agree to 1e-5."""
    a, b = train_records(single), train_records(multi)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        for key in keys:
            assert b[step][key] == pytest.approx(a[step][key], abs=1e-5), (label, step, key)
    wa, wb = final_weights(single), final_weights(multi)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], atol=1e-5, rtol=0, msg=f"{label} {key}")


@pytest.fixture(scope="session")
def single(tmp_path_factory, tiny_model_dir, pair_files):
    """The one-process run the two-process runs must equal (built once per test run; read only)."""
    model_dir = tiny_model_dir("llama")

    def build(path: Path) -> None:
        launch(path, "run", 1, model_dir, pair_files, f"trainer.max_steps={STEPS}")

    return built_once(tmp_path_factory, "single", build) / "run"


# Each run below trained by one torchrun launch of two ranks, one run after the other: a launch's start-up
# (torchrun, two interpreters importing torch and transformers, the process group) is paid once, not per run.
# After the runs, shutdown() leaves no wrapped model (holding the group) for the interpreter's exit to collect.
# The same launch first runs the parallelism checks of test_tensor_parallel.py and test_context_parallel.py.
TRAIN_EACH = """
import gc, json, sys
from pathlib import Path
from preftune.config_checks import load_config
from preftune.recipe import train
from preftune.training.distributed import shutdown

if len(sys.argv) > 2:
    out, sys.path[:0] = Path(sys.argv[2]), [sys.argv[3]]
    from tensor_parallel_checks import run_checks
    from test_context_parallel import check_context_parallel

    run_checks(out / "tensor-parallel-checks.json")
    check_context_parallel(out / "context-parallel")
for overrides in json.loads(sys.argv[1]):
    train(load_config(None, overrides))
shutdown()
gc.set_debug(gc.DEBUG_SAVEALL)
gc.collect()
left = {type(o).__name__ for o in gc.garbage} & {"DistributedDataParallel", "FSDPState", "DeviceMesh"}
assert not left, f"shutdown left {sorted(left)} for the interpreter's exit to collect"
"""

# context parallelism: both ranks read the same pairs, each holds half of every row
CONTEXT_PARALLEL = (
    "distributed.context_parallel=2",
    "data.packing=true",
    "data.share_prompt=true",
    "data.pack_length=96",
)
LAYOUTS = {
    "ddp": (),
    "fsdp2": (),
    "fsdp2-packed": ("data.packing=true", "data.share_prompt=true", "data.pack_length=96"),
    "ddp-packed-masks": ("data.packing=true", "data.pack_length=96", "model.attn_implementation=sdpa"),
    "fsdp2-cp": CONTEXT_PARALLEL,
}


TENSOR_PARALLEL = ("distributed.strategy=fsdp2", "distributed.tensor_parallel=2")
# greedy samples and judged validation at steps 0 and 3 (generation through the policy under FSDP2 / TP; the
# reference's generations through the sharded frozen reference, or the policy with its adapters off)
JUDGED = ("trainer.samples.num_prompts=2", "trainer.samples.max_new_tokens=4", "trainer.judge_prompts=2")
LORA = ("model.lora.r=4", *JUDGED)
SAMPLE_TOKENS = 6  # the fsdp2-samples run's


def build_two_process_runs(
    root: Path,
    model_dir: Path,
    other_model_dir: Path,
    mixtral_dir: Path,
    pair_files: dict,
    online_files: dict,
    length_judge: str,
) -> None:
    """conftest's ``two_process_runs``: the parallelism checks, then every two-process run of the tests in
    ``root/NAME``, in one torchrun launch (the one-process steps the ``one-then-*`` runs resume first); the
    online runs of test_online.py too."""
    from test_online import TWO_RANKS, online_overrides

    steps = f"trainer.max_steps={STEPS}"
    runs = {}
    for name, layout in LAYOUTS.items():
        runs[name] = (steps, f"distributed.strategy={name.split('-')[0]}", *layout)
    reference = f"reference.path={other_model_dir}"
    for strategy in ("ddp", "fsdp2"):
        runs[f"pre-{strategy}"] = (steps, f"distributed.strategy={strategy}", "reference.mode=precompute")
        runs[f"resume-{strategy}"] = ("trainer.max_steps=1", f"distributed.strategy={strategy}")
        runs[f"reference-{strategy}"] = (
            steps,
            f"distributed.strategy={strategy}",
            reference,
            *JUDGED,
            length_judge,
        )
    runs["fsdp2-lora"] = (steps, "distributed.strategy=fsdp2", *LORA, length_judge)
    runs["tp"] = (steps, *TENSOR_PARALLEL)
    runs["pre-tp"] = (steps, *TENSOR_PARALLEL, "reference.mode=precompute")
    runs["reference-tp"] = (
        steps,
        *TENSOR_PARALLEL,
        reference,
        *JUDGED,
        length_judge,
    )  # split like the policy
    runs["tp-lora"] = (steps, *TENSOR_PARALLEL, *LORA, length_judge)
    runs["resume-tp"] = ("trainer.max_steps=1", *TENSOR_PARALLEL)
    runs["one-then-tp"] = (steps, *TENSOR_PARALLEL)  # resumes the step one process saves below
    runs["one-then-tp-lora"] = (steps, *TENSOR_PARALLEL, *LORA, length_judge)  # and its adapter's
    # greedy samples: both ranks generate (FSDP2's forwards are collectives), rank 0 alone writes
    samples = ("trainer.samples.num_prompts=2", f"trainer.samples.max_new_tokens={SAMPLE_TOKENS}")
    runs["fsdp2-samples"] = ("trainer.max_steps=2", "distributed.strategy=fsdp2", *samples)
    balancing = (f"model.path={mixtral_dir}", "optim.sched.warmup_steps=2", "distributed.strategy=fsdp2")
    runs["fsdp2-mixtral"] = (steps, *balancing)
    # and the recomputation of activation checkpointing, whose backward gathers the keys again
    precompute = ("reference.mode=precompute", "model.activation_checkpointing=true")
    runs["pre-cp"] = (steps, "distributed.strategy=fsdp2", *precompute, *CONTEXT_PARALLEL)

    launch(root, "one-then-tp", 1, model_dir, pair_files, "trainer.max_steps=1")
    launch(root, "one-then-tp-lora", 1, model_dir, pair_files, "trainer.max_steps=1", *LORA, length_judge)
    script = root / "train_each.py"
    script.write_text(TRAIN_EACH)
    every = [train_args(root / name, model_dir, pair_files, *o) for name, o in runs.items()]
    every += [
        online_overrides(
            model_dir, online_files, root / f"online-{s}", *TWO_RANKS, f"distributed.strategy={s}"
        )
        for s in ("ddp", "fsdp2")
    ]
    cmd = [*torchrun(2)[:-2], str(script), json.dumps(every), str(root), str(Path(__file__).parent)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


@pytest.mark.parametrize(
    "strategy, layout",
    [
        ("ddp", ()),
        ("fsdp2", ()),
        ("fsdp2", ("data.packing=true", "data.share_prompt=true", "data.pack_length=96")),
        ("ddp", ("data.packing=true", "data.pack_length=96", "model.attn_implementation=sdpa")),
        ("fsdp2", CONTEXT_PARALLEL),
    ],
    ids=["ddp", "fsdp2", "fsdp2-packed", "ddp-packed-masks", "fsdp2-cp"],
)
def test_two_processes_equal_one(strategy, layout, single, two_process_runs, request):
    # packed rows differ per rank, so ranks run different numbers of micro-batches: FSDP2 must still agree
    name = request.node.callspec.id
    assert LAYOUTS[name] == layout and name.split("-")[0] == strategy
    multi = two_process_runs / name
    assert_same_run(single, multi, STEP_KEYS, strategy)
    assert train_records(multi)[1]["train/loss"] == pytest.approx(0.693147, abs=1e-5)
    lines = (multi / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len({(json.loads(x)["step"], "train/loss" in x) for x in lines}), "rank 0 alone logs"


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2", "tp", "cp"])
def test_precomputed_reference_under_two_processes(strategy, single, two_process_runs):
    multi = two_process_runs / f"pre-{strategy}"
    assert len(list((multi / "cache/reference").glob("*.pt"))) == 2, "one cache file per dataset"
    a, b = train_records(single), train_records(multi)
    for step in a:
        for key in ("train/loss", "train/acc", "train/rewards_chosen_mean"):
            # CP's packed rows: the cached pass lays the pairs out in other rows than the step does, so at
            # step 1 (policy = reference) the rewards are float noise (~1e-7) and acc is the sign of that noise
            if not (strategy == "cp" and step == 1 and key == "train/acc"):
                assert b[step][key] == pytest.approx(a[step][key], abs=1e-5), (step, key)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2", "tp"])
def test_two_process_checkpoint_resumes_on_one(
    strategy, single, two_process_runs, tmp_path, tiny_model_dir, pair_files
):
    model_dir = tiny_model_dir("llama")
    out = copy_run(two_process_runs / f"resume-{strategy}", tmp_path, "resume")  # 1 step on 2 processes
    assert (out / "checkpoints/step_1/optimizer").is_dir()
    launch(tmp_path, "resume", 1, model_dir, pair_files, f"trainer.max_steps={STEPS}")
    a, b = train_records(single), train_records(out)
    assert sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        assert b[step]["train/loss"] == pytest.approx(a[step]["train/loss"], abs=1e-5), (strategy, step)
    wa, wb = final_weights(single), final_weights(out)
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], atol=1e-5, rtol=0, msg=key)


@pytest.fixture(scope="session")
def single_with_reference(tmp_path_factory, tiny_model_dir, other_model_dir, pair_files, length_judge):
    """``single`` with a separate reference model, samples and judged validation (built once per test run;
    read only)."""
    model_dir, reference = tiny_model_dir("llama"), f"reference.path={other_model_dir}"

    def build(path: Path) -> None:
        launch(path, "run", 1, model_dir, pair_files, f"trainer.max_steps={STEPS}", reference, *JUDGED,
               length_judge)  # fmt: skip

    return built_once(tmp_path_factory, "single-reference", build) / "run"


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2", "tp"])
def test_reference_path_under_two_processes(strategy, single_with_reference, two_process_runs):
    """A separate reference (``reference.path``; FSDP2 shards it too) gives what it gives in one process, its
    judged generations (made once, through the sharded reference, every rank joining) included."""
    multi = two_process_runs / f"reference-{strategy}"
    keys = ("train/loss", "train/ref_logps_chosen_mean", "train/rewards_chosen_mean", "train/grad_norm")
    assert_same_run(single_with_reference, multi, keys, strategy)
    judged = (single_with_reference / "judged.jsonl").read_text()
    assert (multi / "judged.jsonl").read_text() == judged and len(judged.splitlines()) == 4
    first = train_records(single_with_reference)[1]["train/preference_loss"]
    assert abs(first - math.log(2)) > 1e-3  # the reference is not the policy


def test_global_batch_balancing_under_two_processes(tmp_path, mixtral_dir, pair_files, two_process_runs):
    """A Mixtral policy's balancing loss over the global batch (``model.router_aux_loss_scope``'s
    default): two FSDP2 ranks, each running two of the four micro-batches (and its statistics forwards
    through the sharded model), train what one process trains. DDP takes the same path (measured equal)."""
    steps = f"trainer.max_steps={STEPS}"
    single = run(tmp_path, "single", mixtral_dir, pair_files, steps, "data.micro_batch_size=2", "optim.eps=1e-4",
                 f"optim.sched.max_steps={STEPS}")[1]  # fmt: skip
    keys = ("train/loss", "train/aux_loss", "train/preference_loss", "train/grad_norm")
    assert_same_run(single, two_process_runs / "fsdp2-mixtral", keys, "fsdp2")
    assert train_records(single)[1]["train/aux_loss"] > 1


@pytest.fixture(scope="session")
def single_lora(tmp_path_factory, tiny_model_dir, pair_files, length_judge):
    """``single`` with LoRA adapters and samples (built once per test run; read only)."""
    model_dir = tiny_model_dir("llama")

    def build(path: Path) -> None:
        launch(path, "run", 1, model_dir, pair_files, f"trainer.max_steps={STEPS}", *LORA, length_judge)

    return built_once(tmp_path_factory, "single-lora", build) / "run"


def logged_keys(output_dir: Path) -> tuple[str, ...]:
    """Every value a training step logs but its timings."""
    timings = ("train/step_time", "train/pairs_per_sec", "train/tokens_per_sec")
    return tuple(k for k in train_records(output_dir)[1] if k.startswith("train/") and k not in timings)


@pytest.mark.parametrize("name", ["tp", "one-then-tp"])
def test_tensor_parallel_equals_one_process(name, single, two_process_runs):
    """distributed.tensor_parallel=2: each block's weights split over both ranks, which read the same pairs;
    ``one-then-tp`` resumes under TP a step saved by one process (its optimizer state resharded by DCP)."""
    multi = two_process_runs / name
    assert_same_run(single, multi, logged_keys(single), name)
    lines = (multi / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len({(json.loads(x)["step"], "train/loss" in x) for x in lines}), "rank 0 alone logs"


@pytest.mark.parametrize("name", ["fsdp2-lora", "tp-lora"])
def test_lora_under_fsdp2_and_tensor_parallel(name, single_lora, two_process_runs):
    """LoRA adapters under FSDP2, with and without TP: the same steps, adapter, greedy samples and judged
    generations (step 0: the base model's; step 3: through the trained adapters) as one process."""
    multi = two_process_runs / name
    assert_same_run(single_lora, multi, logged_keys(single_lora), name)
    assert set(final_weights(multi)) == set(final_weights(single_lora)) and all(
        "lora_" in k for k in final_weights(multi)
    )
    for name, lines in (("samples.jsonl", 4), ("judged.jsonl", 4)):
        written = (multi / name).read_text()
        assert written == (single_lora / name).read_text() and len(written.splitlines()) == lines, name


def test_lora_step_of_one_process_resumes_under_tensor_parallel(single_lora, two_process_runs):
    """A LoRA step saved by one process, resumed under TP=2 (rank 0 reads the adapter, each rank receives its
    shards of it): the one-process run's steps and final adapter."""
    multi = two_process_runs / "one-then-tp-lora"
    assert_same_run(single_lora, multi, logged_keys(single_lora), "one-then-tp-lora")


def test_tensor_parallel_export_is_a_plain_model(single, two_process_runs, tmp_path):
    """``preftune export`` of a TP=2 checkpoint: a Hugging Face model with one process's final weights."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "export"
    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(two_process_runs / f"tp/checkpoints/step_{STEPS}"),
                "--output",
                str(out),
            ]
        )
        == 0
    )
    exported = AutoModelForCausalLM.from_pretrained(out).state_dict()
    expected = final_weights(single)
    assert set(expected) <= set(exported)
    for key, value in expected.items():
        assert type(exported[key]) is torch.Tensor
        torch.testing.assert_close(exported[key], value, atol=1e-5, rtol=0, msg=key)


FOUR_PROCESS_RUNS = {
    "dp2-tp2": TENSOR_PARALLEL,  # mesh dp 2 x cp 1 x tp 2
    "dp2-cp2": ("distributed.strategy=fsdp2", *CONTEXT_PARALLEL),  # mesh dp 2 x cp 2 x tp 1
    "cp2-tp2": (*TENSOR_PARALLEL, *CONTEXT_PARALLEL),  # mesh dp 1 x cp 2 x tp 2
}


@pytest.fixture(scope="session")
def four_process_runs(tmp_path_factory, tiny_model_dir, pair_files) -> Path:
    """One torchrun launch of 4 processes training each of ``FOUR_PROCESS_RUNS`` (built once; read only)."""

    def build(root: Path) -> None:
        script = root / "train_each.py"
        script.write_text(TRAIN_EACH)
        every = [
            train_args(
                root / name, tiny_model_dir("llama"), pair_files, f"trainer.max_steps={STEPS}", *layout
            )
            for name, layout in FOUR_PROCESS_RUNS.items()
        ]
        cmd = [*torchrun(4)[:-2], str(script), json.dumps(every)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]

    return built_once(tmp_path_factory, "four-process-runs", build)


@pytest.mark.parametrize("name", FOUR_PROCESS_RUNS)
def test_four_processes_on_a_mesh_equal_one(name, single, four_process_runs):
    """FSDP2 over 2 data-parallel groups, each group 2 tensor-parallel ranks or 2 context-parallel ones (the
    groups read different pairs, the ranks of a group the same), and one group of 2 context x 2 tensor ranks."""
    multi = four_process_runs / name
    assert_same_run(single, multi, logged_keys(single) if "cp" not in name else STEP_KEYS, name)


def test_samples_under_fsdp2(tiny_model_dir, pair_files, two_process_runs):
    """Both ranks generate (FSDP2's forwards are collectives), rank 0 alone writes: the greedy samples of
    2 validation prompts at steps 0 and 2, the first ones those of the starting model."""
    from test_samples import greedy

    rows = [
        json.loads(line)
        for line in (two_process_runs / "fsdp2-samples/samples.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in rows] == [0, 0, 2, 2]
    validation = [json.loads(line) for line in pair_files["validation"].read_text().splitlines()]
    for row, pair in zip(rows[:2], validation, strict=False):
        assert (row["generation"], row["num_tokens"]) == greedy(
            tiny_model_dir("llama"), pair["prompt"], SAMPLE_TOKENS
        )
