"""The demo's rule is checkable (chosen responses obey it, rejected ones do not) and its validation
prompts are really held out (none appears among the training prompts)."""

from __future__ import annotations

import json

from preftune.tools.demo import make_preference_pairs, obeys_rule, prepare_demo, rule_share


def test_validation_prompts_are_disjoint_from_training(tmp_path):
    paths = prepare_demo(tmp_path / "demo", n_train=600, n_val=64, seed=0)
    train = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    val = [json.loads(line) for line in paths["validation"].read_text().splitlines()]
    assert len(val) == 64 and len({r["prompt"] for r in val}) == 64
    assert not {r["prompt"] for r in val} & {r["prompt"] for r in train}


def test_default_split_sizes_are_disjoint_and_the_rule_is_checkable():
    train = make_preference_pairs(4000, 0)
    val = make_preference_pairs(256, 1, held_out_from=train)
    assert not {p["prompt"] for p in val} & {p["prompt"] for p in train}
    for pair in train[:500] + val:
        assert obeys_rule(pair["prompt"], pair["chosen_response"])
        assert not obeys_rule(pair["prompt"], pair["rejected_response"])
    prompt = "List 3 fruits in UPPERCASE, in reverse alphabetical order.\n"
    assert obeys_rule(prompt, "PLUM, MANGO, APPLE")
    assert not obeys_rule(prompt, "PLUM, MANGO, APPLE, FIG")  # one too many
    assert not obeys_rule(prompt, "PLUM, PLUM, APPLE")  # repeated
    assert not obeys_rule(prompt, "plum, mango, apple")  # case
    assert not obeys_rule(prompt, "APPLE, MANGO, PLUM")  # order
    assert not obeys_rule(prompt, "WOLF, MANGO, APPLE")  # category


def test_rule_share_per_step(tmp_path):
    prompt = "List 3 fruits in lowercase, alphabetically.\n"
    rows = [
        {"step": 0, "prompt": prompt, "generation": "apple apple"},
        {"step": 0, "prompt": prompt, "generation": "apple, fig, plum"},
        {"step": 5, "prompt": prompt, "generation": "apple, fig, plum"},
    ]
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert rule_share(path) == {0: 0.5, 5: 1.0}
