"""Judges (`judge.*`): reward functions with TRL's signature, a reward model read through its own tokenizer,
an LLM judge whose answers are parsed (and counted when they cannot be), its pairwise comparison in both
orders; every user mistake one `ConfigError` line."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from preftune.cli import main
from preftune.config import ConfigError, default_config
from preftune.modeling.judges import Scores, build_judge, check_judge, judge_is_set

RULES = """
def length(prompts, completions, completion_ids, **kwargs):
    return [float(len(c)) for c in completions]


def ends_with_period(completions, **kwargs):
    return [1 if c.endswith(".") else 0 for c in completions]


def abstains_on_empty(completions, **kwargs):
    return [None if c == "" else 2.0 for c in completions]


def echo_inputs(prompts, completions, completion_ids, **kwargs):
    SEEN.append(dict(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs))
    return [0.0] * len(completions)


def one_too_few(completions, **kwargs):
    return [0.0] * (len(completions) - 1)


def words(completions, **kwargs):
    return ["good" for _ in completions]


SEEN = []
NOT_A_FUNCTION = 3
"""


def judge_cfg(**settings):
    """The `judge` section: the defaults with `settings` merged in (dotted keys as nested dicts)."""
    return OmegaConf.merge(default_config().judge, settings)


@pytest.fixture
def rules(tmp_path) -> Path:
    path = tmp_path / "rules.py"
    path.write_text(RULES)
    return path


def score(judge, prompts, completions, **columns) -> Scores:
    return judge.score(prompts, completions, [[7] * len(c) for c in completions], **columns)


def assert_one_line_error(match: str, call) -> str:
    with pytest.raises(ConfigError) as raised:
        call()
    message = str(raised.value)
    assert "\n" not in message and match in message, message
    return message


# --- reward functions -----------------------------------------------------------------------------------------


def test_function_from_a_file_and_from_a_module(rules, monkeypatch):
    completions = ["ab.", "abcd", ""]
    judge = build_judge(judge_cfg(function=f"{rules}:length"), dtype=None)
    assert judge.description == f"function {rules}:length"
    assert score(judge, ["p", "q", "r"], completions) == Scores([3.0, 4.0, 0.0], 0)

    (rules.parent / "mypkg").mkdir()
    (rules.parent / "mypkg" / "__init__.py").write_text("")
    (rules.parent / "mypkg" / "rewards.py").write_text(RULES)
    monkeypatch.syspath_prepend(str(rules.parent))
    judge = build_judge(judge_cfg(function="mypkg.rewards:ends_with_period"), dtype=None)
    assert score(judge, ["p", "q", "r"], completions) == Scores([1.0, 0.0, 0.0], 0)


def test_weighted_functions_and_none_as_nan(rules):
    judge = build_judge(
        judge_cfg(function=[f"{rules}:length", f"{rules}:ends_with_period"], weights=[0.5, 2.0]), dtype=None
    )
    assert judge.description == f"function 0.5 x {rules}:length + 2 x {rules}:ends_with_period"
    # 0.5 * 3 + 2 * 1 and 0.5 * 4 + 2 * 0
    assert score(judge, ["p", "q"], ["ab.", "abcd"]) == Scores([3.5, 2.0], 0)

    # TRL's None is NaN: alone it leaves the reward NaN (counted); beside a number, that number counts
    alone = score(
        build_judge(judge_cfg(function=f"{rules}:abstains_on_empty"), dtype=None), ["p", "q"], ["", "x"]
    )
    assert math.isnan(alone.rewards[0]) and alone.rewards[1] == 2.0 and alone.unparsed == 1
    both = build_judge(
        judge_cfg(function=[f"{rules}:abstains_on_empty", f"{rules}:length"], weights=[3, 1]), dtype=None
    )
    assert score(both, ["p", "q"], ["", "xy"]) == Scores([0.0, 3 * 2.0 + 2.0], 0)


def test_function_gets_what_trl_passes(rules):
    """Conversational prompts: completions come as assistant messages, as TRL's trainers pass them; the
    ids and any extra columns arrive by keyword."""
    import importlib

    judge = build_judge(judge_cfg(function=f"{rules}:echo_inputs"), dtype=None)
    module = importlib.import_module(judge.functions[0][1].__module__)
    conversation = [{"role": "user", "content": "hi"}]
    judge.score([conversation, conversation], ["a", "b"], [[5, 6], [8]], answer=["x", "y"])
    judge.score(["plain"], ["c"], [[9]])
    conversational, plain = module.SEEN
    assert conversational == dict(
        prompts=[conversation, conversation],
        completions=[[{"role": "assistant", "content": "a"}], [{"role": "assistant", "content": "b"}]],
        completion_ids=[[5, 6], [8]],
        answer=["x", "y"],
    )
    assert plain == dict(prompts=["plain"], completions=["c"], completion_ids=[[9]])


def test_function_mistakes_are_one_line(rules, tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("import no_such_module_anywhere\n")
    cases = {
        f"{tmp_path}/absent.py:f": f"file {tmp_path}/absent.py not found",
        f"{rules}:missing": "has no 'missing'",
        f"{rules}:NOT_A_FUNCTION": "NOT_A_FUNCTION in file",
        f"{broken}:f": f"importing {broken} failed: ModuleNotFoundError",
        "no_such_package.rewards:f": "importing module no_such_package.rewards failed",
        "just_a_name": "expected 'path/to/file.py:name' or 'package.module:name'",
    }
    for spec, expected in cases.items():
        assert_one_line_error(expected, lambda spec=spec: check_judge(judge_cfg(function=spec)))
    assert_one_line_error(
        "judge.weights has 1 entries for 2",
        lambda: check_judge(judge_cfg(function=[f"{rules}:length"] * 2, weights=[1])),
    )
    assert_one_line_error(
        "are both set", lambda: check_judge(judge_cfg(function=f"{rules}:length", reward_model="some/model"))
    )
    wrong_count = build_judge(judge_cfg(function=f"{rules}:one_too_few"), dtype=None)
    message = assert_one_line_error(
        "returned 1 values for 2 completions", lambda: score(wrong_count, ["p"] * 2, ["a", "b"])
    )
    assert f"{rules}:one_too_few" in message
    not_numbers = build_judge(judge_cfg(function=f"{rules}:words"), dtype=None)
    message = assert_one_line_error("'good' (str) at position 0", lambda: score(not_numbers, ["p"], ["a"]))
    assert f"{rules}:words" in message


def test_judge_is_set():
    assert not judge_is_set(judge_cfg())
    assert judge_is_set(judge_cfg(function="m:f")) and judge_is_set(judge_cfg(llm={"path": "policy"}))


def test_cli_refuses_a_bad_judge_before_loading(tmp_path, tiny_model_dir, pair_files, capsys, monkeypatch):
    config = tmp_path / "run.yaml"
    config.write_text("{}\n")
    import transformers

    def no_model_loads(*args, **kwargs):
        raise AssertionError("a model was loaded before the mistake was reported")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model_loads)
    model_dir = tiny_model_dir("llama")
    capsys.readouterr()
    code = main(
        [
            "train",
            "--config",
            str(config),
            f"model.path={model_dir}",
            f"data.train={pair_files['train']}",
            f"output_dir={tmp_path / 'out'}",
            f"judge.function={tmp_path}/absent.py:reward",
        ]
    )
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "absent.py not found" in lines[0], lines
