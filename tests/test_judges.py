"""Judges (`judge.*`): reward functions with TRL's signature, a reward model read through its own tokenizer,
an LLM judge whose answers are parsed (and counted when they cannot be), its pairwise comparison in both
orders; every user mistake one `ConfigError` line."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GenerationMixin,
    LlamaConfig,
    LlamaForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from preftune.cli import main
from preftune.config import default_config
from preftune.config_checks import load_config
from preftune.errors import ConfigError
from preftune.modeling.judges import Comparisons, Scores, build_judge, check_judge, judge_is_set
from preftune.tools.tiny import save_tiny, train_tokenizer

from conftest import sentence

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


def as_array(completions, **kwargs):
    import numpy

    return numpy.full(len(completions), 0.25, dtype=numpy.float32)


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
    array = score(build_judge(judge_cfg(function=f"{rules}:as_array"), dtype=None), ["p", "q"], ["", "x"])
    assert array == Scores([0.25, 0.25], 0)  # a numpy array (or tensor) of numbers is accepted, as TRL does
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


def test_readme_example_function(tmp_path):
    """The worked example of README's Judges section, as written there, on plain and conversational prompts."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    example = readme.split("```python\n# rules.py\n", 1)[1].split("```", 1)[0]
    (tmp_path / "rules.py").write_text(example)
    judge = build_judge(judge_cfg(function=f"{tmp_path}/rules.py:polite"), dtype=None)
    expected = [1.0 - 0.01 * 3, -0.01 * 2]  # "please" and 3 tokens; no "please" and 2 tokens
    plain = judge.score(["p", "q"], ["yes please", "no"], [[4, 5, 6], [7, 8]])
    assert plain.rewards == pytest.approx(expected) and plain.unparsed == 0
    chat = judge.score([[{"role": "user", "content": "p"}]] * 2, ["yes please", "no"], [[4, 5, 6], [7, 8]])
    assert chat.rewards == pytest.approx(expected)


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
    assert_one_line_error("is an empty list", lambda: check_judge(judge_cfg(function=[])))
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


# --- reward model ---------------------------------------------------------------------------------------------

CHAT = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TURNS = ["<|user|>", "<|assistant|>"]


def chat_tokenizer(texts: list[str], vocab_size: int):
    """A tiny tokenizer of its own vocabulary with a chat template and no pad token."""
    tok = train_tokenizer(texts, vocab_size=vocab_size, extra_special_tokens=TURNS)
    tok.pad_token = None
    tok.chat_template = CHAT
    return tok


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory) -> Path:
    """A one-label Llama reward model (pad_token_id unset) saved with its own chat tokenizer."""
    rng = random.Random(3)
    tok = chat_tokenizer([sentence(rng, 8) + " ok fine" for _ in range(200)], vocab_size=200)
    config = LlamaConfig(
        vocab_size=320,  # room for the policy tokenizer's ids too, so feeding them runs (and differs)
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_labels=1,
        pad_token_id=None,
        bos_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    return save_tiny(model, tok, tmp_path_factory.mktemp("reward-model"))


def test_reward_model_reads_with_its_own_tokenizer(reward_model_dir, tokenizer):
    prompts = ["the cat sits", [{"role": "user", "content": "a dog runs"}], "no"]
    completions = ["under the tree", "far over the hill near a river", "yes"]
    policy_ids = [tokenizer(c, add_special_tokens=False).input_ids for c in completions]
    judge = build_judge(judge_cfg(reward_model=str(reward_model_dir), batch_size=2), dtype=torch.float32)
    assert judge.description == f"reward model {reward_model_dir}"
    assert not judge.model.training and not any(p.requires_grad for p in judge.model.parameters())
    scores = judge.score(prompts, completions, policy_ids)
    assert scores.unparsed == 0
    assert judge.score(prompts, completions, [[5]] * 3) == scores  # the policy's ids are never read

    # the independent path: one unpadded forward per completion, rendered by hand with the RM's template
    model = AutoModelForSequenceClassification.from_pretrained(reward_model_dir).eval()
    rm_tok = AutoTokenizer.from_pretrained(reward_model_dir)
    assert rm_tok.pad_token is None  # the judge pads with EOS; the saved tokenizer is left as it was
    for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        user = prompt if isinstance(prompt, str) else prompt[0]["content"]
        ids = rm_tok(f"<|user|>{user}<|assistant|>{completion}", add_special_tokens=False).input_ids
        with torch.no_grad():
            direct = model(torch.tensor([ids])).logits[0, 0].item()
            policy_ids_fed = (
                model(torch.tensor([tokenizer(f"{user}{completion}").input_ids])).logits[0, 0].item()
            )
        assert scores.rewards[i] == pytest.approx(direct, abs=1e-5)
        assert abs(policy_ids_fed - direct) > 1e-4  # another tokenizer's ids read as something else

    half = build_judge(judge_cfg(reward_model=str(reward_model_dir)), dtype=torch.bfloat16)
    assert half.model.dtype == torch.bfloat16  # the run's dtype
    assert half.score(prompts, completions, policy_ids).rewards == pytest.approx(scores.rewards, abs=0.05)


def test_reward_model_mistakes(reward_model_dir, tiny_model_dir, tmp_path):
    two_labels = tmp_path / "two-labels"
    config = AutoConfig.from_pretrained(reward_model_dir)
    config.num_labels = 2
    LlamaForSequenceClassification(config).save_pretrained(two_labels)
    assert_one_line_error("has 2 labels", lambda: check_judge(judge_cfg(reward_model=str(two_labels))))
    causal = tiny_model_dir("llama")
    assert_one_line_error(
        "is a LlamaForCausalLM, not a sequence-classification model",
        lambda: check_judge(judge_cfg(reward_model=str(causal))),
    )
    assert_one_line_error(
        "does not exist", lambda: check_judge(judge_cfg(reward_model=str(tmp_path / "absent")))
    )


# --- LLM judge ------------------------------------------------------------------------------------------------


class ScriptedConfig(PretrainedConfig):
    model_type = "scripted_judge"


class ScriptedJudge(PreTrainedModel, GenerationMixin):
    """A causal LM whose greedy answer is fixed by a Python function of the question it is asked.

    Each forward reads the whole sequence (no cache): the question is what precedes the last `<|assistant|>`
    token, the answer so far what follows it; the next token is the scripted answer's next token, then EOS.
    The judge under test runs it through `generate` exactly as it runs a real model; only what the model
    answers is scripted, since that is not what is tested."""

    config_class = ScriptedConfig

    def __init__(self, config, tokenizer, answer_for):
        super().__init__(config)
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # a device and dtype for generate
        self.tokenizer, self.answer_for = tokenizer, answer_for
        self.modes: list[bool] = []  # self.training at each forward
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # no cache: each forward gets the whole sequence

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def forward(self, input_ids, attention_mask=None, **kwargs):
        self.modes.append(self.training)
        assert not torch.is_grad_enabled()
        start = self.tokenizer.convert_tokens_to_ids("<|assistant|>")
        logits = torch.full((*input_ids.shape, self.config.vocab_size), -1e4)
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        for row, (ids, mask) in enumerate(zip(input_ids.tolist(), attention_mask.tolist(), strict=True)):
            real = [t for t, m in zip(ids, mask, strict=True) if m]
            cut = len(real) - 1 - real[::-1].index(start)
            question = self.tokenizer.decode(real[:cut], skip_special_tokens=True)
            script = self.tokenizer(self.answer_for(question), add_special_tokens=False).input_ids
            script.append(self.tokenizer.eos_token_id)
            answered = len(real) - cut - 1
            logits[row, -1, script[min(answered, len(script) - 1)]] = 0.0
        return CausalLMOutputWithPast(logits=logits)


@pytest.fixture(scope="module")
def judge_tokenizer():
    rng = random.Random(4)
    return chat_tokenizer(
        [sentence(rng, 10) + " Score: 12345 Better: A B" for _ in range(200)], vocab_size=260
    )


def scripted(tokenizer, answer_for) -> ScriptedJudge:
    return ScriptedJudge(ScriptedConfig(vocab_size=len(tokenizer)), tokenizer, answer_for)


def grade_by_word(question: str) -> str:
    """Graded by the word in the completion (after 'C='): 'good' 4, 'bad' 1, anything else no score."""
    completion = question.split("C=", 1)[1]
    if "good" in completion:
        return "It helps. Score: 4"
    return "It does not. Score: 1" if "bad" in completion else "I cannot tell."


def test_llm_judge_parses_scores_and_counts_failures(judge_tokenizer):
    model = scripted(judge_tokenizer, grade_by_word)
    model.train()
    cfg = judge_cfg(llm={"path": "policy", "template": "P={prompt} C={completion}"}, batch_size=2)
    judge = build_judge(cfg, dtype=torch.float32, policy=model, policy_tokenizer=judge_tokenizer)
    assert judge.description == "LLM judge the policy (self-rewarding)"
    rng_state = torch.get_rng_state()
    scores = judge.score(
        ["a", [{"role": "user", "content": "b"}], "c"], ["so good", "bad one", "odd"], [[1]] * 3
    )
    assert torch.equal(torch.get_rng_state(), rng_state)  # greedy: the global RNG is not drawn from
    assert scores.rewards[:2] == [4.0, 1.0] and math.isnan(scores.rewards[2]) and scores.unparsed == 1
    assert judge.last_answers == ["It helps. Score: 4", "It does not. Score: 1", "I cannot tell."]
    assert model.modes and not any(model.modes) and model.training  # eval while judging, train mode restored


def test_shipped_templates_hold_prompt_and_completion(judge_tokenizer):
    questions = []

    def record(question: str) -> str:
        questions.append(question)
        return "Score: 3"

    judge = build_judge(
        judge_cfg(llm={"path": "policy"}),
        dtype=None,
        policy=scripted(judge_tokenizer, record),
        policy_tokenizer=judge_tokenizer,
    )
    assert judge.score(["the cat sits"], ["under the tree"], [[1]]) == Scores([3.0], 0)
    assert "Request:\nthe cat sits\n\nReply:\nunder the tree\n" in questions[0] and "Score: N" in questions[0]


def prefer(question: str) -> str:
    """Picks the reply holding 'good' if either does, else always A (pure position bias); 'odd' gets no verdict."""
    a = question.split("Reply A:\n", 1)[1].split("\n\nReply B:\n", 1)[0]
    b = question.split("\n\nReply B:\n", 1)[1]
    if "odd" in a + b:
        return "Hmm."
    return "Better: B" if "good" in b and "good" not in a else "Better: A"


def test_pairwise_is_asked_in_both_orders(judge_tokenizer):
    model = scripted(judge_tokenizer, prefer)
    judge = build_judge(
        judge_cfg(llm={"path": "policy"}), dtype=None, policy=model, policy_tokenizer=judge_tokenizer
    )
    rng_state = torch.get_rng_state()
    result = judge.compare(
        ["p"] * 4, ["good x", "plain", "same", "odd"], ["plain", "good y", "same", "plain"]
    )
    assert torch.equal(torch.get_rng_state(), rng_state)
    # first better; second better; position bias alone (always A) cancels to a tie; no verdict -> tie, counted
    assert result == Comparisons([1.0, 0.0, 0.5, 0.5], unparsed=2)


def test_llm_judge_from_a_directory_batches_like_single(tiny_model_dir):
    """A real tiny LM: its greedy answers are the same in left-padded batches as one by one, and (random
    weights) none holds a score: every one is counted as unparsed, none guessed."""
    path = str(tiny_model_dir("llama"))
    prompts, completions = (
        ["the cat", "a dog runs far", "no"],
        ["sits", "under the tree near the river", "yes"],
    )
    answers = []
    for batch_size in (3, 1):
        judge = build_judge(
            judge_cfg(llm={"path": path, "max_new_tokens": 6}, batch_size=batch_size), dtype=torch.float32
        )
        scores = judge.score(prompts, completions, [[1]] * 3)
        assert scores.unparsed == 3 and all(math.isnan(r) for r in scores.rewards)
        answers.append(judge.last_answers)
    assert answers[0] == answers[1] and any(answers[0])


def test_llm_judge_mistakes(tmp_path):
    assert_one_line_error(
        "neither a template",
        lambda: check_judge(judge_cfg(llm={"path": "policy", "template": "no placeholders"})),
    )
    assert_one_line_error(
        "has no {prompt}",
        lambda: check_judge(judge_cfg(llm={"path": "policy", "template": "C={completion}"})),
    )
    template_file = tmp_path / "grade.txt"
    template_file.write_text("Q: {prompt}\nA: {completion}\nScore:")
    check_judge(judge_cfg(llm={"path": "policy", "template": str(template_file)}))
    assert_one_line_error(
        "does not exist", lambda: check_judge(judge_cfg(llm={"path": str(tmp_path / "absent")}))
    )


def test_policy_judge_uses_the_runs_chat_template(judge_tokenizer):
    """`data.chat_template` of the run, passed as `policy_chat_template`, frames the question, not the
    tokenizer's own template."""
    seen = []

    def record(question: str) -> str:
        seen.append(question)
        return "Score: 2"

    run_template = CHAT.replace("<|{{ m.role }}|>", "<|{{ m.role }}|>[run] ")
    judge = build_judge(
        judge_cfg(llm={"path": "policy", "template": "P={prompt} C={completion}"}),
        policy=scripted(judge_tokenizer, record),
        policy_tokenizer=judge_tokenizer,
        policy_chat_template=run_template,
    )
    assert judge.score(["x"], ["y"], [[1]]) == Scores([2.0], 0)
    assert set(seen) == {"[run] P=x C=y"}  # asked at every generated token


def test_judge_rules_hold_at_load():
    """The rules of the section alone are checked when the config loads (no file is imported yet)."""
    base = ["model.path=m", "data.train=t.jsonl"]
    assert_one_line_error(
        "are both set", lambda: load_config(None, [*base, "judge.function=m:f", "judge.llm.path=policy"])
    )
    assert_one_line_error(
        "judge.weights has 2 entries for 1",
        lambda: load_config(None, [*base, "judge.function=m:f", "judge.weights=[1,2]"]),
    )
    assert load_config(None, [*base, "judge.function=[m:f, n:g]", "judge.weights=[1, 2]"]).judge.weights == [
        1.0,
        2.0,
    ]
