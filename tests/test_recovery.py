"""Long runs that look after themselves, each fault provoked for real: checkpoint retention, non-finite steps,
a full disk, damaged checkpoints and caches, one run per directory, nothing unsafe loaded."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.api import CheckpointException

from preftune.cli import main
from preftune.config_checks import load_config
from preftune.data.batch import padded_micro_batches
from preftune.data.dataset import PreferenceDataset
from preftune.data.sampler import GlobalBatchSampler
from preftune.errors import CheckpointError, ConfigError
from preftune.modeling.model import DPOModel
from preftune.modeling.reference_cache import ReferenceCache, model_fingerprint
from preftune.run_dir import LOCK_FILE
from preftune.training.checkpoint import Checkpointer
from preftune.training.manifest import manifest_bytes, problem, write_manifest
from preftune.training.retention import Retention, SavedCheckpoint, checkpoints_to_delete

from conftest import copy_run, make_pairs, records, run, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "model" / "model.safetensors")


def assert_same_run(out: Path, reference: Path, steps: int = 6) -> None:
    """Same losses, gradient norms and learning rates at every step, and the same final weights."""
    a, b = records(reference, "train"), records(out, "train")
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    for step in a:
        for key in ("train/loss", "train/grad_norm", "train/lr", "train/skipped"):
            assert a[step][key] == b[step][key], (step, key)
    wa, wb = weights(reference / f"checkpoints/step_{steps}"), weights(out / f"checkpoints/step_{steps}")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def cli_train(out: Path, model_dir: Path, files: dict, capsys, *overrides: str) -> tuple[int, str, str]:
    """``preftune train`` in this process (run's settings); (exit status, stdout, stderr)."""
    config = out.parent / f"{out.name}.yaml"
    config.write_text(
        f"model: {{path: {model_dir}}}\noutput_dir: {out}\n"
        f"data: {{train: {files['train']}, validation: {files['validation']}, max_seq_length: 48, "
        "micro_batch_size: 4, global_batch_size: 8}\n"
        "optim: {lr: 5.0e-3, sched: {warmup_steps: 2}}\ntrainer: {val_check_interval: 100, save_interval: 100}\n"
    )
    capsys.readouterr()
    status = main(["train", "--config", str(config), *overrides])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def error_line(err: str) -> str:
    """The one error line (it may follow a progress bar the failing step left unfinished on its line)."""
    found = err.count("preftune: error:")
    assert found == 1 and "Traceback" not in err, err
    return "preftune: error:" + err.split("preftune: error:")[1].split("\n")[0].split("\r")[0]


# ------------------------------------------------------------------------------------------ retention


def test_retention_rule():
    saved = [SavedCheckpoint(2, 0.5), SavedCheckpoint(4, 0.3), SavedCheckpoint(6, 0.4)]
    saved += [SavedCheckpoint(8, None), SavedCheckpoint(10, 0.6)]
    assert checkpoints_to_delete(saved, 10, Retention()) == []  # keep_last null: all
    assert checkpoints_to_delete(saved, 10, Retention(keep_last=2)) == [2, 4, 6]
    assert checkpoints_to_delete(saved, 10, Retention(2, "val/loss", "min", 1)) == [2, 6]  # 4 is best
    assert checkpoints_to_delete(saved, 10, Retention(1, "val/loss", "max", 2)) == [4, 6, 8]  # 10, 2 best
    assert checkpoints_to_delete(saved, 10, Retention(1), protected=[4]) == [2, 6, 8]  # resumed from 4
    # a resumed run at step 6: 8 and 10 are left by an earlier attempt, neither counted nor deleted
    assert checkpoints_to_delete(saved, 6, Retention(1, "val/loss", "min", 1)) == [2]
    nan = [SavedCheckpoint(1, float("nan")), SavedCheckpoint(2, 0.9), SavedCheckpoint(3, 1.0)]
    assert checkpoints_to_delete(nan, 3, Retention(1, "val/loss", "min", 1)) == [1]  # NaN is never best
    tie = [SavedCheckpoint(1, 0.5), SavedCheckpoint(2, 0.5), SavedCheckpoint(3, 0.7)]
    assert checkpoints_to_delete(tie, 3, Retention(1, "val/loss", "min", 1)) == [1]  # the newer of a tie


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.keep_last=0", "keep at least 1"),
        ("trainer.keep_last=two", "trainer.keep_last='two'"),
        ("trainer.keep_best.metric=loss", "use a validation metric"),
        ("trainer.keep_best.mode=lowest", "use min or max"),
        ("trainer.keep_best.n=0", "keep at least 1 best"),
        ("trainer.max_skipped_steps=0", "trainer.max_skipped_steps=0"),
    ],
)
def test_retention_and_skip_settings_are_checked(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["model.path=m", "data.train=t", override])


@pytest.mark.slow
def test_keep_last_and_best_across_resume(tmp_path, tiny_model_dir, pair_files):
    settings = (
        "trainer.save_interval=1",
        "trainer.val_check_interval=1",
        "trainer.keep_last=1",
        "trainer.keep_best.metric=val/loss",
        "trainer.keep_best.mode=max",  # the worst loss, so that the best is not simply the newest
        "optim.sched.max_steps=6",
    )
    model_dir = tiny_model_dir("llama")
    _, out = run(tmp_path, "run", model_dir, pair_files, "trainer.max_steps=3", *settings)

    def kept() -> list[int]:
        return [step for step, _ in Checkpointer(out).complete()]

    def best(last: int) -> int:
        val = records(out, "val")
        return max(range(1, last + 1), key=lambda s: (val[s]["val/loss"], s))

    assert kept() == sorted({best(3), 3})
    run(tmp_path, "run", model_dir, pair_files, "trainer.max_steps=6", *settings)
    assert kept() == sorted({best(6), 3, 6})  # 3: resumed from, never deleted by the run resumed from it
    for step, path in Checkpointer(out).complete():
        assert problem(path) is None
        saved = json.loads((path / "val_metrics.json").read_text())
        assert saved["val/loss"] == records(out, "val")[step]["val/loss"]


# ------------------------------------------------------------------------------------ non-finite steps


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_and_resume_stays_exact(
    tmp_path, tiny_model_dir, pair_files, straight_run, capsys
):
    """A pair whose reward overflows float32 gives its step an infinite RPO loss: the step is not applied,
    under 4-way gradient accumulation. Steps 1 (no optimizer state yet) and 4 hold one each; the other steps
    train, and a run stopped right after each skipped step and resumed ends equal to a straight one."""
    order = GlobalBatchSampler(48, 8, seed=1234)  # data.seed: the pairs of each step
    batches = list(order)
    pairs = make_pairs(48, seed=1)
    for step in (1, 4):
        pairs[batches[step - 1][3]].update(chosen_reward=1e39, rejected_reward=0.0)  # float32: inf
    files = {"train": write_jsonl(tmp_path / "train.jsonl", pairs), "validation": pair_files["validation"]}
    settings = ("dpo.preference_loss=rpo_sq", "data.micro_batch_size=2", "trainer.save_interval=1")
    model_dir = tiny_model_dir("llama")
    capsys.readouterr()
    _, skipping = run(tmp_path, "straight", model_dir, files, "trainer.max_steps=6", *settings)
    log = capsys.readouterr().out
    recs = records(skipping, "train")
    assert [step for step, rec in recs.items() if rec["train/skipped"]] == [1, 4]
    assert log.count("skipped (loss") == 2 and "step 1 skipped" in log and "step 4 skipped" in log
    assert recs[1]["train/loss"] in ("inf", "nan") and recs[4]["train/loss"] in ("inf", "nan")
    states = [load_file(model_dir / "model.safetensors")]
    states += [weights(skipping / f"checkpoints/step_{step}") for step in range(1, 7)]
    for step in range(1, 7):
        before, after = states[step - 1], states[step]
        unchanged = all(torch.equal(before[k], after[k]) for k in after)
        assert unchanged == (step in (1, 4)), step  # skipped steps change nothing, the others train
        assert all(torch.isfinite(t).all() for t in after.values())
    clean = records(straight_run, "train")  # the schedule advanced through the skipped steps
    assert [recs[s]["train/lr"] for s in range(1, 7)] == [clean[s]["train/lr"] for s in range(1, 7)]

    for stop in (1, 4, 6):  # stopped right after each skipped step, then resumed
        run(
            tmp_path,
            "resumed",
            model_dir,
            files,
            f"trainer.max_steps={stop}",
            "optim.sched.max_steps=6",
            *settings,
        )
    assert_same_run(tmp_path / "resumed", skipping)


def test_a_skipped_first_step_steps_no_scheduler_before_the_optimizer(
    tmp_path, tiny_model_dir, pair_files, recwarn
):
    """PyTorch warns when the scheduler steps before the optimizer ever has, which a skipped first step did:
    its gradients are dropped and the optimizer steps over none, then the scheduler. The schedule still
    advances through the skipped step: warmup 2 at lr 5e-3 gives 2.5e-3, then 5e-3."""
    first_batch = next(iter(GlobalBatchSampler(48, 8, seed=1234)))  # data.seed: the pairs of step 1
    pairs = make_pairs(48, seed=1)
    pairs[first_batch[0]].update(chosen_reward=1e39, rejected_reward=0.0)  # float32: an infinite RPO loss
    files = {"train": write_jsonl(tmp_path / "train.jsonl", pairs), "validation": pair_files["validation"]}
    overrides = ("dpo.preference_loss=rpo_sq", "trainer.max_steps=2")
    _, out = run(tmp_path, "skipping", tiny_model_dir("llama"), files, *overrides)
    assert [str(w.message) for w in recwarn if "lr_scheduler.step()" in str(w.message)] == []
    recs = records(out, "train")
    assert [recs[s]["train/skipped"] for s in (1, 2)] == [1, 0]
    assert [recs[s]["train/lr"] for s in (1, 2)] == [2.5e-3, 5e-3]


@pytest.fixture
def broken_model_dir(tmp_path, tiny_model_dir):
    """The tiny model with one infinite weight: every loss is NaN."""
    out = tmp_path / "broken-model"
    shutil.copytree(tiny_model_dir("llama"), out)
    state = load_file(out / "model.safetensors")
    state["model.norm.weight"][0] = float("inf")
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.slow
def test_nonfinite_steps_in_a_row_stop_with_one_line(tmp_path, broken_model_dir, pair_files, capsys):
    out = tmp_path / "run"
    status, log, err = cli_train(
        out, broken_model_dir, pair_files, capsys, "trainer.max_skipped_steps=2", "trainer.max_steps=6"
    )
    assert status == 2
    line = error_line(err)
    assert "steps 1-2" in line and "optim.lr" in line and "gradient_clip_val" in line, line
    assert "step 1 skipped" in log + err and "step 2 skipped" in log + err
    assert Checkpointer(out).latest() is None
    assert [r["train/skipped"] for r in records(out, "train").values()] == [1]  # step 2 stopped the run

    # saving at step 1 would write the infinite weights: refused
    status, _, err = cli_train(
        tmp_path / "saving", broken_model_dir, pair_files, capsys, "trainer.save_interval=1"
    )
    assert status == 2
    assert "weights are no longer finite" in error_line(err)
    assert Checkpointer(tmp_path / "saving").latest() is None


# ------------------------------------------------------------------------------------------ full disk


FULL_DISK_SETTINGS = ("trainer.save_interval=2", "trainer.keep_last=1", "optim.sched.max_steps=6")


def mount_tmpfs(where: Path, size: int, remount: bool = False) -> bool:
    where.mkdir(exist_ok=True)
    options = f"{'remount,' if remount else ''}size={size}"
    cmd = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)]
    try:
        return subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture
def small_disk(tmp_path):
    """``tmp_path/disk``: a tmpfs of its own (64 MiB until a test shrinks it), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("a size-limited filesystem is a tmpfs this test mounts, which needs root")
    disk = tmp_path / "disk"
    if not mount_tmpfs(disk, 64 << 20):
        pytest.skip("mount -t tmpfs was refused (a container without CAP_SYS_ADMIN?)")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, timeout=30)


def save_fails_then_resumes(out: Path, model_dir: Path, pair_files: dict, straight: Path, capsys, limited):
    """Train to step 2 (step_2 saved), then towards step 6 inside ``limited(step_2)`` (a context manager that
    leaves too little room for step_4): exit 2 with one line, nothing but an intact step_2 left. Then the
    same command without the limit resumes to the straight run. Returns the line and the error the write
    raised (observed, not replaced)."""
    run(out.parent, out.name, model_dir, pair_files, "trainer.max_steps=2", *FULL_DISK_SETTINGS)
    step_2 = out / "checkpoints/step_2"
    raised = []
    write = Checkpointer._write

    def observed_write(self, *args, **kwargs):
        try:
            return write(self, *args, **kwargs)
        except BaseException as error:
            raised.append(error)
            raise

    Checkpointer._write = observed_write
    try:
        with limited(step_2):
            status, _, err = cli_train(
                out, model_dir, pair_files, capsys, "trainer.max_steps=6", *FULL_DISK_SETTINGS
            )
    finally:
        Checkpointer._write = write
    assert status == 2 and len(raised) == 1
    line = error_line(err)
    assert f"could not save checkpoint step_4 in {out / 'checkpoints'}: " in line, line
    assert f"{manifest_bytes(step_2):,} bytes" in line and "resumes from step_2" in line, line
    assert "The partial checkpoint was removed; free space and run the same command" in line, line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_2"]  # partial one removed
    assert problem(step_2) is None  # the earlier checkpoint untouched (keep_last=1 deleted nothing)

    status, _, err = cli_train(out, model_dir, pair_files, capsys, "trainer.max_steps=6", *FULL_DISK_SETTINGS)
    assert status == 0, err
    assert_same_run(out, straight)
    # keep_last=1 kept step_6 and the checkpoint this run resumed from
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_2", "step_6"]
    return line, raised[0]


def pages(size: int) -> int:
    """Bytes a file of ``size`` bytes takes on a tmpfs (whole 4 KiB pages)."""
    return -(-size // 4096) * 4096


@pytest.mark.slow
@pytest.mark.parametrize("fails_in", ["weights", "optimizer"])
def test_full_disk_stops_cleanly_and_resumes(
    fails_in, small_disk, tiny_model_dir, pair_files, straight_run, capsys
):
    """A real full filesystem (a tmpfs shrunk to what is there plus part of a checkpoint) fails step_4's
    save in safetensors' write of the weights (a ``SafetensorError``) or in DCP's write of the optimizer
    state (torch's zip writer: ``RuntimeError: unexpected pos``, wrapped in DCP's ``CheckpointException``)."""
    room = {}

    @contextlib.contextmanager
    def full_disk(step_2: Path):
        files = {str(p.relative_to(step_2)): p.stat().st_size for p in step_2.rglob("*") if p.is_file()}
        weights, optimizer_data = files["model/model.safetensors"], files["optimizer/__0_0.distcp"]
        if fails_in == "weights":  # half the weights file (it is written first)
            room["bytes"] = pages(files["model/config.json"]) + weights // 2
        else:  # every other file, and a twentieth of the optimizer state's data
            before = [n for n in files if not n.startswith("optimizer/") and n != "manifest.json"]
            room["bytes"] = sum(pages(files[n]) for n in before) + pages(files["optimizer/.metadata"])
            room["bytes"] += optimizer_data // 20
        stat = os.statvfs(small_disk)
        used = (stat.f_blocks - stat.f_bfree) * stat.f_frsize
        assert mount_tmpfs(small_disk, used + room["bytes"], remount=True)
        try:
            yield
        finally:  # space freed
            assert mount_tmpfs(small_disk, 64 << 20, remount=True)

    line, raised = save_fails_then_resumes(
        small_disk / "run", tiny_model_dir("llama"), pair_files, straight_run, capsys, full_disk
    )
    if fails_in == "weights":
        assert type(raised).__name__ == "SafetensorError", repr(raised)
    else:
        assert isinstance(raised, CheckpointException), repr(raised)
        assert [type(e) for e, _ in raised.failures.values()] == [RuntimeError], raised.failures
        assert "unexpected pos" in str(raised)
    assert "the disk is full (" in line and "No space left on device" in line, line
    free = int(
        re.search(r"; ([\d,]+) bytes free on that filesystem, a checkpoint needs ", line)[1].replace(",", "")
    )
    assert 0 < free <= room["bytes"], (free, room)


@pytest.mark.slow
def test_file_size_limit_stops_cleanly_and_resumes(
    tmp_path, tiny_model_dir, pair_files, straight_run, capsys
):
    """No file may grow as large as the checkpoint's largest (RLIMIT_FSIZE; no root needed)."""

    @contextlib.contextmanager
    def file_size_limit(step_2: Path):
        largest = max(p.stat().st_size for p in step_2.rglob("*") if p.is_file())
        previous_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
        previous_handler = signal.getsignal(signal.SIGXFSZ)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (largest - 1, previous_limit[1]))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, previous_limit)
            signal.signal(signal.SIGXFSZ, previous_handler)

    line, _ = save_fails_then_resumes(
        tmp_path / "run", tiny_model_dir("llama"), pair_files, straight_run, capsys, file_size_limit
    )
    assert "the write failed (File too large); " in line, line


# ------------------------------------------------------------------------------- damaged checkpoints


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate", "alter"])
def test_damaged_checkpoint_falls_back_to_previous(
    damage, tmp_path, tiny_model_dir, pair_files, half_run, straight_run, capsys
):
    out = copy_run(half_run, tmp_path)
    step_4 = out / "checkpoints/step_4"
    if damage == "truncate":
        target = step_4 / "model/model.safetensors"
        target.write_bytes(target.read_bytes()[:-1])
    else:
        target = next((step_4 / "optimizer").glob("*.distcp"))
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
        # with every checkpoint damaged there is nothing to resume from: one line, nothing trained
        shutil.copy(target, out / "checkpoints/step_2/optimizer" / target.name)
        with pytest.raises(CheckpointError, match="No complete checkpoint to resume from"):
            run(tmp_path, "run", tiny_model_dir("llama"), pair_files, "trainer.max_steps=6")
        shutil.copy(
            half_run / "checkpoints/step_2/optimizer" / target.name, out / "checkpoints/step_2/optimizer"
        )
    capsys.readouterr()
    run(
        tmp_path, "run", tiny_model_dir("llama"), pair_files, "trainer.max_steps=6", "trainer.save_interval=2"
    )
    log = capsys.readouterr().out
    assert f"checkpoint {step_4} is damaged: {target.relative_to(step_4).as_posix()}" in log
    assert "resuming from step_2 instead" in log
    assert_same_run(out, straight_run)


# ------------------------------------------------------------------------------------------ caches


def test_damaged_caches_are_rebuilt(tmp_path, tiny_model_dir, pair_files, tokenizer, caplog):
    cache_dir = tmp_path / "tokenized"
    first = PreferenceDataset(pair_files["train"], tokenizer, 48, cache_dir)
    (cache_file,) = cache_dir.iterdir()
    for damage in ("truncate", "alter"):
        data = bytearray(cache_file.read_bytes())
        if damage == "truncate":
            data = data[: len(data) // 2]
        else:
            tokens = first.examples.columns["chosen_ids"][:16].numpy().tobytes()  # a token id changes
            data[data.index(tokens) + 5] ^= 0x01
        cache_file.write_bytes(bytes(data))
        with caplog.at_level(logging.WARNING):
            caplog.clear()
            again = PreferenceDataset(pair_files["train"], tokenizer, 48, cache_dir)
        assert not again.from_cache and "is damaged" in caplog.text and "rebuilding" in caplog.text, damage
        assert [again[i] for i in range(len(again))] == [first[i] for i in range(len(first))]
        assert PreferenceDataset(pair_files["train"], tokenizer, 48, cache_dir).from_cache  # rewritten whole

    model_dir = tiny_model_dir("llama")
    cfg = load_config(None, [f"model.path={model_dir}", f"data.train={pair_files['train']}"])
    dataset = PreferenceDataset(pair_files["validation"], tokenizer, 48)

    def build(model: DPOModel) -> ReferenceCache:
        collate = partial(padded_micro_batches, micro_batch_size=4, eos_id=tokenizer.eos_token_id)
        fingerprint = model_fingerprint(model_dir, "float32")
        return ReferenceCache.load_or_build(
            model, dataset, collate, tmp_path / "ref", model_fingerprint=fingerprint, batch_pairs=8
        )

    model = DPOModel.from_config(cfg)
    ref = build(model)
    ref.path.write_bytes(ref.path.read_bytes()[:-10])
    with caplog.at_level(logging.WARNING):
        caplog.clear()
        rebuilt = build(model)
    assert not rebuilt.from_cache and "is damaged" in caplog.text
    assert torch.equal(rebuilt.logps, ref.logps)
    assert build(model).from_cache


# ------------------------------------------------------------------------------------- one run per dir


@pytest.mark.slow
def test_second_run_on_a_live_directory_is_refused(tmp_path, tiny_model_dir, pair_files, capsys):
    model_dir = tiny_model_dir("llama")
    out = tmp_path / "run"
    config = tmp_path / "live.yaml"
    config.write_text(
        f"model: {{path: {model_dir}}}\ndata: {{train: {pair_files['train']}}}\noutput_dir: {out}\n"
    )
    long_run = ("trainer.max_epochs=null", "trainer.max_steps=100000", "trainer.save_interval=100000")
    live = subprocess.Popen(
        [sys.executable, "-m", "preftune", "train", "--config", str(config), *long_run],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 240
        while not (out / LOCK_FILE).is_file() and live.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert live.poll() is None, "the first run ended early"
        owner = json.loads((out / LOCK_FILE).read_text())
        assert owner["pid"] == live.pid
        status, _, err = cli_train(out, model_dir, pair_files, capsys, "trainer.max_steps=1")
        assert status == 2
        line = error_line(err)
        assert f"pid {live.pid} on {owner['host']}" in line and str(out) in line, line
    finally:
        live.kill()
        live.wait()
    # its lock stays behind (SIGKILL): taken over with a warning, then released at the end
    status, _, err = cli_train(out, model_dir, pair_files, capsys, "trainer.max_steps=1")
    assert status == 0, err
    assert f"taking over {out / LOCK_FILE} left by pid {live.pid}, no longer running" in err
    assert not (out / LOCK_FILE).exists()


# ----------------------------------------------------------------------------------- safe loading


class RunsCode:
    """Unpickling this creates a marker file: what a malicious checkpoint would do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["rng.pt", "scheduler.pt"])
def test_checkpoint_with_code_in_a_pickle_is_refused(
    name, tmp_path, tiny_model_dir, pair_files, half_run, capsys
):
    out = copy_run(half_run, tmp_path)
    step_4 = out / "checkpoints/step_4"
    marker = tmp_path / "code-ran"
    torch.save({"state": RunsCode(marker)}, step_4 / name)
    write_manifest(step_4)  # a consistent manifest: only the loader stands in the way
    status, _, err = cli_train(out, tiny_model_dir("llama"), pair_files, capsys, "trainer.max_steps=6")
    assert status == 2
    assert f"{step_4 / name}: refused to load" in error_line(err)
    assert not marker.exists()
    torch.load(step_4 / name, weights_only=False)  # the file really would have run code
    assert marker.exists()


def test_every_load_is_weights_only_and_remote_code_is_opt_in():
    sources = {p: p.read_text() for p in (ROOT / "preftune").rglob("*.py")}
    loads = [
        (p, text.split("torch.load(")[i + 1].split(")")[0])
        for p, text in sources.items()
        for i in range(text.count("torch.load("))
    ]
    assert loads
    for path, args in loads:
        assert "weights_only=True" in args, (path, args)
    assert not any("trust_remote_code=True" in text for text in sources.values())
    assert load_config(None, ["model.path=m", "data.train=t"]).model.trust_remote_code is False
