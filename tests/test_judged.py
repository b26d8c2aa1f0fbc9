"""Judged validation (``trainer.judge_prompts``): the same training trajectory with judging on or off, the
logged metrics recomputed from the judged generations, the reference's generations made once per run (a
resume loads them) and equal to the base model's own greedy answers."""

from __future__ import annotations

import html
import json
import math
from collections import Counter

import pytest
from omegaconf import OmegaConf
from test_judges import judge_tokenizer, prefer, scripted  # noqa: F401 (judge_tokenizer: a fixture)
from test_samples import greedy

from preftune.cli import main
from preftune.config import default_config
from preftune.modeling.judges import build_judge
from preftune.training import judged
from preftune.training.win_rate import lc_win_rate, length_ratio, score_outcomes, win_rate

from conftest import records, run

pytestmark = pytest.mark.slow

JUDGE = '''
def length(prompts, completions, **kwargs):
    """Longer is better: a judge with a length bias."""
    return [float(len(c.split())) for c in completions]
'''


@pytest.fixture
def judge_file(tmp_path):
    path = tmp_path / "judge.py"
    path.write_text(JUDGE)
    return f"{path}:length"


def base_greedy(model_dir, prompt: str, max_new_tokens: int) -> tuple[str, int]:
    """The base model's greedy answer from transformers directly, a cut multi-byte character dropped."""
    text, num_tokens = greedy(model_dir, prompt, max_new_tokens)
    return text.rstrip("\ufffd"), num_tokens


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_an_llm_judge_compares_in_both_orders(judge_tokenizer):  # noqa: F811 (the fixture)
    """With an LLM judge the win rate is its pairwise verdict, asked with the policy first and then second: a
    judge that always answers "A" between two equal replies gives a tie, not a win; the rewards are its
    grades (all equal here, so by score every prompt would tie)."""

    def answer(question: str) -> str:
        return prefer(question) if "Reply A:" in question else "Score: 2"

    judge = build_judge(
        OmegaConf.merge(default_config().judge, {"llm": {"path": "policy"}}),
        policy=scripted(judge_tokenizer, answer),
        policy_tokenizer=judge_tokenizer,
    )
    policy = ["good x", "same", "good z"]
    reference = ["plain", "same", "plain"]

    def ids(texts):
        return [judge_tokenizer(t, add_special_tokens=False).input_ids for t in texts]

    judgement, texts, reference_texts = judged.judge_generations(
        judge, ["p"] * 3, ids(policy), ids(reference), judge_tokenizer
    )
    assert (texts, reference_texts) == (policy, reference)
    assert judgement.outcomes == [1.0, 0.5, 1.0]
    assert judgement.rewards == judgement.reference_rewards == [2.0] * 3
    metrics = judgement.metrics()
    assert metrics["win_rate"] == pytest.approx(2.5 / 3) and metrics["judge_reward"] == 2.0


def test_judging_leaves_the_trajectory_unchanged(tmp_path, tiny_model_dir, pair_files, judge_file):
    model_dir = tiny_model_dir("llama")
    common = ("trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.samples.max_new_tokens=6")
    _, off = run(tmp_path, "off", model_dir, pair_files, *common)
    judging = (f"judge.function={judge_file}", "trainer.judge_prompts=5", "trainer.samples.num_prompts=2")
    _, on = run(tmp_path, "on", model_dir, pair_files, *common, *judging)
    a, b = records(off, "train"), records(on, "train")
    assert a.keys() == b.keys() == {1, 2, 3, 4}
    for step in a:
        for key in ("train/loss", "train/grad_norm", "train/acc"):
            assert a[step][key] == b[step][key], (step, key)
    assert records(off, "val")[4]["val/loss"] == records(on, "val")[4]["val/loss"]

    rows = read_jsonl(on / "judged.jsonl")
    assert [r["step"] for r in rows] == [0] * 5 + [2] * 5 + [4] * 5
    first_two = {r["prompt"] for r in rows[:2]}
    samples = read_jsonl(on / "samples.jsonl")  # the samples are the first judged generations
    assert [s["generation"] for s in samples] == [r["generation"] for r in rows if r["prompt"] in first_two]
    for step, val in records(on, "val").items():
        judged_rows = [r for r in rows if r["step"] == step]
        for row in judged_rows:
            assert row["reward"] == len(row["generation"].split())  # the judge's number, unaltered
            assert row["reference_reward"] == len(row["reference"].split())
        outcomes = score_outcomes(
            [r["reward"] for r in judged_rows], [r["reference_reward"] for r in judged_rows]
        )
        lengths = [r["num_tokens"] for r in judged_rows], [r["reference_num_tokens"] for r in judged_rows]
        assert [r["outcome"] for r in judged_rows] == outcomes
        assert val["val/win_rate"] == win_rate(outcomes)
        assert val["val/lc_win_rate"] == pytest.approx(lc_win_rate(outcomes, *lengths), abs=1e-12)
        assert val["val/length_ratio"] == length_ratio(*lengths)
        assert val["val/judge_reward"] == pytest.approx(sum(r["reward"] for r in judged_rows) / 5)
        assert val["val/judge_reward_reference"] == pytest.approx(
            sum(r["reference_reward"] for r in judged_rows) / 5
        )
    step0 = records(on, "val")[0]  # the step-0 policy is the reference: every prompt a tie
    assert step0["val/win_rate"] == 0.5 and step0["val/length_ratio"] == 1.0
    assert step0["val/lc_win_rate"] == pytest.approx(0.5, abs=1e-9)

    # the report draws the judged curves of the judged run and shows its last judged prompts side by side
    page = tmp_path / "report/report.html"
    assert main(["report", str(on), str(off), "--output", str(page)]) == 0
    pngs = {p.stem for p in (tmp_path / "report/report_png").glob("*.png")}
    assert {"win_rate", "judge_reward", "length_ratio"} <= pngs
    judged_part = page.read_text().split("Judged against the reference")[1].split("<h2>")[0]
    assert "<h3>on, step 4</h3>" in judged_part and "<h3>off" not in judged_part
    last = [r for r in rows if r["step"] == 4]
    tally = Counter({1.0: "policy", 0.0: "reference", 0.5: "tie"}[r["outcome"]] for r in last)
    assert f"the policy better on {tally['policy']}, the reference on {tally['reference']}" in judged_part
    assert judged_part.count("<tr><td>") == 5
    for r in last:
        assert html.escape(r["generation"]) in judged_part and html.escape(r["reference"]) in judged_part


def test_reference_generations_made_once_per_run(
    tmp_path, tiny_model_dir, pair_files, judge_file, monkeypatch
):
    calls = []
    real = judged.generate_reference

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(judged, "generate_reference", counted)
    model_dir = tiny_model_dir("llama")
    common = (f"judge.function={judge_file}", "trainer.judge_prompts=3", "trainer.samples.max_new_tokens=5")
    _, out = run(tmp_path, "run", model_dir, pair_files, "trainer.max_steps=2", *common)
    assert len(calls) == 1
    _, out = run(tmp_path, "run", model_dir, pair_files, "trainer.max_steps=4", *common)  # resumes at step 2
    assert len(calls) == 1, "the resumed run loads the reference's generations"
    rows = read_jsonl(out / "judged.jsonl")
    assert [r["step"] for r in rows] == [0] * 3 + [2] * 3 + [4] * 3
    assert len({(r["prompt"], r["reference"]) for r in rows}) == 3  # the same reference at every step
    validation = read_jsonl(pair_files["validation"])
    assert [r["prompt"] for r in rows[:3]] == [p["prompt"] for p in validation[:3]]  # the data's own prompts
    # the first two prompts fit data.max_seq_length whole (the third is cut, so the model reads less of it)
    for row, pair in zip(rows[:2], validation, strict=False):
        assert (row["reference"], row["reference_num_tokens"]) == base_greedy(model_dir, pair["prompt"], 5)
    assert math.isfinite(records(out, "val")[4]["val/lc_win_rate"])


def test_eval_judges_and_all_checkpoints_resume(
    tmp_path, tiny_model_dir, pair_files, judge_file, monkeypatch, capsys
):
    """``preftune eval`` of the final checkpoint repeats the run's last judged validation (the reference's
    generations read from the run's cache) and checks the judge on the pairs; ``--all-checkpoints``
    interrupted after one checkpoint goes on without redoing it."""
    from preftune.tools import evaluate
    from preftune.tools.report import load_run

    judging = (f"judge.function={judge_file}", "trainer.judge_prompts=4", "trainer.samples.max_new_tokens=5")
    steps = ("trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.save_interval=2")
    _, out = run(tmp_path, "run", tiny_model_dir("llama"), pair_files, *steps, *judging)
    config = str(out / "config.yaml")
    reference_calls = []
    monkeypatch.setattr(judged, "generate_reference", lambda *a, **k: reference_calls.append(1))
    report = tmp_path / "eval.json"
    assert (
        main(
            [
                "eval",
                "--config",
                config,
                "--checkpoint",
                str(out / "checkpoints/step_4"),
                "--json",
                str(report),
            ]
        )
        == 0
    )
    metrics = json.loads(report.read_text())["metrics"]
    last = records(out, "val")[4]
    for key in ("win_rate", "lc_win_rate", "length_ratio", "judge_reward", "judge_reward_reference"):
        assert metrics[key] == pytest.approx(last[f"val/{key}"], abs=1e-9), key
    assert reference_calls == []
    # the judge on the data's pairs: chosen longer (in words) than rejected, ties wrong
    validation = read_jsonl(pair_files["validation"])
    longer = [len(p["chosen_response"].split()) > len(p["rejected_response"].split()) for p in validation]
    assert metrics["judge_pairs"] == 16 and metrics["judge_pair_acc"] == sum(longer) / 16

    evaluated = []
    real = evaluate.Evaluation.metrics

    def interrupted_after_one(self, path):
        if evaluated:
            raise KeyboardInterrupt
        evaluated.append(path.name)
        return real(self, path)

    monkeypatch.setattr(evaluate.Evaluation, "metrics", interrupted_after_one)
    assert main(["eval", "--config", config, "--all-checkpoints", str(out)]) == 130
    assert evaluated == ["step_2"] and "interrupted" in capsys.readouterr().out

    def counted(self, path):
        evaluated.append(path.name)
        return real(self, path)

    monkeypatch.setattr(evaluate.Evaluation, "metrics", counted)
    table = tmp_path / "table.json"
    assert main(["eval", "--config", config, "--all-checkpoints", str(out), "--json", str(table)]) == 0
    assert evaluated == ["step_2", "step_4"], "step_2 was not evaluated again"
    rows = json.loads(table.read_text())["checkpoints"]
    assert [row["step"] for row in rows] == [2, 4]
    assert rows[1]["metrics"]["win_rate"] == metrics["win_rate"]
    assert rows[0]["metrics"]["loss"] == pytest.approx(records(out, "val")[2]["val/loss"], rel=1e-5)
    assert "evaluated before" in capsys.readouterr().out
    run_record = load_run(out)  # the report reads --all-checkpoints' results as eval/ curves
    assert run_record.series("eval", "win_rate") == ([2, 4], [r["metrics"]["win_rate"] for r in rows])


def test_a_generation_cut_inside_a_character_drops_the_broken_tail(tokenizer):
    from preftune.training.samples import decode_generation

    ids = tokenizer("red purple é", add_special_tokens=False).input_ids
    cut = next(k for k in range(1, len(ids)) if tokenizer.decode(ids[:k]).endswith("\ufffd"))
    assert tokenizer.decode(ids[:cut]).endswith("\ufffd")  # the byte-level tokens stop inside "é"
    assert decode_generation(tokenizer, ids[:cut]) == tokenizer.decode(ids[:cut]).rstrip("\ufffd")
    assert decode_generation(tokenizer, ids[:cut]) == "red purple "
    assert decode_generation(tokenizer, ids) == "red purple é"


def test_judge_prompts_need_a_judge(capsys, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model: {path: m}\ndata: {train: t.jsonl}\n")
    assert main(["train", "--config", str(config), "trainer.judge_prompts=3"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "preftune: error: trainer.judge_prompts=3 needs a judge: set judge.function, judge.reward_model or "
        "judge.llm.path (or trainer.judge_prompts=0)"
    ]
    assert main(["train", "--config", str(config), "trainer.judge_prompts=-1"]) == 2
    assert "trainer.judge_prompts=-1: use a number of validation prompts >= 0" in capsys.readouterr().err
