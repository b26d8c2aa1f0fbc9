"""The synthetic preference set behind ``preftune demo``: follow the prompt's listing instruction.

Each prompt asks for N items of a category, in lower or UPPER case, sorted ascending or descending. The
chosen response obeys; the rejected one breaks exactly one constraint (case, order or category), so telling
them apart requires reading the prompt. Train pairs are written with NeMo Aligner keys, validation pairs
with TRL keys, and a tiny Llama + byte-level BPE trained on the train texts is the base model.
"""

import json
import random
from pathlib import Path

from omegaconf import OmegaConf

from preftune.tools.tiny import build_tiny_model, save_tiny, train_tokenizer

CATEGORIES = {
    "fruits": "apple banana cherry fig grape kiwi lemon mango melon peach pear plum".split(),
    "animals": "bear cat dog eagle fox horse lion mouse owl rabbit tiger wolf".split(),
    "colors": "black blue brown cyan gold gray green pink purple red silver white".split(),
    "vegetables": "bean beet cabbage carrot corn garlic kale leek onion potato radish spinach".split(),
    "countries": "brazil canada chile egypt france india japan kenya mexico norway peru spain".split(),
}
CASES = {
    "lower": ("lowercase", "lower case", "small letters"),
    "upper": ("UPPERCASE", "upper case", "capital letters"),
}
ORDERS = {
    "ascending": ("alphabetically", "starting from A", "in ascending order"),
    "descending": ("in reverse alphabetical order", "starting from Z", "in descending order"),
}
TEMPLATES = (
    "List {n} {category} in {case}, {order}.",
    "Name {n} {category}. Use {case} and sort them {order}.",
    "Write {n} {category}, {order}, in {case}.",
    "Give me {n} {category} ({case}, {order}).",
    "I need {n} {category} sorted {order}, written in {case}.",
)
VIOLATIONS = ("case", "order", "category")
COUNTS = (3, 4, 5)


def render(items: list[str], case: str, order: str) -> str:
    """The response listing `items` in the requested case and order."""
    items = sorted(items, reverse=order == "descending")
    return ", ".join(item.upper() if case == "upper" else item for item in items)


def make_pair(rng: random.Random) -> dict:
    """One NeMo-style pair: the rejected response breaks one constraint of the prompt."""
    category, case, order = rng.choice(list(CATEGORIES)), rng.choice(list(CASES)), rng.choice(list(ORDERS))
    n = rng.choice(COUNTS)
    prompt = rng.choice(TEMPLATES).format(
        n=n, category=category, case=rng.choice(CASES[case]), order=rng.choice(ORDERS[order])
    )
    items = rng.sample(CATEGORIES[category], n)
    violation = rng.choice(VIOLATIONS)
    if violation == "case":
        rejected = render(items, "upper" if case == "lower" else "lower", order)
    elif violation == "order":
        rejected = render(items, case, "ascending" if order == "descending" else "descending")
    else:
        other = rng.choice([c for c in CATEGORIES if c != category])
        rejected = render(rng.sample(CATEGORIES[other], n), case, order)
    return {
        "prompt": prompt + "\n",
        "chosen_response": render(items, case, order),
        "rejected_response": rejected,
        "chosen_reward": 1.0,
        "rejected_reward": 0.0,
    }


def make_preference_pairs(n: int, seed: int, *, held_out_from: list[dict] | None = None) -> list[dict]:
    """`n` distinct NeMo-style pairs (no two share prompt and chosen response), deterministic in `seed`.
    With `held_out_from`: no prompt of those pairs appears, and no two of the `n` pairs share a prompt."""
    rng = random.Random(seed)
    excluded = {p["prompt"] for p in held_out_from} if held_out_from is not None else None
    pairs: dict[tuple[str, str], dict] = {}
    while len(pairs) < n:
        pair = make_pair(rng)
        if excluded is not None:
            if pair["prompt"] in excluded:
                continue
            excluded.add(pair["prompt"])
        pairs.setdefault((pair["prompt"], pair["chosen_response"]), pair)
    return list(pairs.values())


def obeys_rule(prompt: str, response: str) -> bool:
    """Whether `response` lists the prompt's number of distinct items of its category, in its case and
    order (the rule the demo's chosen responses follow)."""
    category = next(c for c in CATEGORIES if c in prompt)
    n = next(k for k in COUNTS if str(k) in prompt)
    case = "upper" if any(phrase in prompt for phrase in CASES["upper"]) else "lower"
    order = "descending" if any(phrase in prompt for phrase in ORDERS["descending"]) else "ascending"
    items = [item.strip() for item in response.strip().split(",")]
    if len(items) != n or len(set(items)) != n or any(i.lower() not in CATEGORIES[category] for i in items):
        return False
    return response.strip() == render([i.lower() for i in items], case, order)


def rule_credit(prompt: str, response: str) -> float:
    """Partial credit for the rule, 1.0 exactly when the response obeys it; otherwise five graded checks of
    its items of the prompt's category, summed over 6 (an obeying list always beats one that does not, and
    a response with no item of the category gets 0): the share of the items that are distinct ones of the
    category, how close the item count is to the prompt's, how many distinct ones there are (of the count
    asked), the share written in the prompt's case, and whether they are strictly in the prompt's order.
    A repeated item never earns credit (online training learns to repeat an item when it does)."""
    if obeys_rule(prompt, response):
        return 1.0
    category = next(c for c in CATEGORIES if c in prompt)
    n = next(k for k in COUNTS if str(k) in prompt)
    upper = any(phrase in prompt for phrase in CASES["upper"])
    descending = any(phrase in prompt for phrase in ORDERS["descending"])
    items = [item.strip() for item in response.strip().split(",")]
    valid = [item for item in items if item.lower() in CATEGORIES[category]]
    if not valid:
        return 0.0
    distinct = len({item.lower() for item in valid})
    ordered = valid == sorted(valid, key=str.lower, reverse=descending)
    checks = (
        distinct / len(items),
        max(0.0, 1 - abs(len(items) - n) / n),
        min(1.0, distinct / n),
        sum(item == (item.upper() if upper else item.lower()) for item in valid) / len(valid),
        float(distinct > 1 and distinct == len(valid) and ordered),
    )
    return sum(checks) / 6


def rule_reward(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """The demo's judge (``judge.function: preftune.tools.demo:rule_reward``, TRL's reward-function
    signature): ``rule_credit`` of each completion."""
    return [rule_credit(prompt, completion) for prompt, completion in zip(prompts, completions, strict=True)]


def write_jsonl(path: Path, records: list[dict]) -> None:
    """One JSON object per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def prepare_demo(out_dir: Path, *, n_train: int = 4000, n_val: int = 256, seed: int = 0) -> dict[str, Path]:
    """Write the demo data, base model and config under `out_dir`; returns their paths."""
    out_dir = Path(out_dir).resolve()
    paths = {
        "train": out_dir / "data" / "train.jsonl",
        "validation": out_dir / "data" / "validation.jsonl",
        "model": out_dir / "base_model",
        "config": out_dir / "demo.yaml",
    }
    train = make_preference_pairs(n_train, seed)
    val = make_preference_pairs(n_val, seed + 1, held_out_from=train)  # prompts never seen in training
    write_data(train, val, paths)
    write_base_model(train, paths["model"], seed)
    OmegaConf.save(OmegaConf.create(demo_config(paths, out_dir / "run", seed)), paths["config"])
    print(f"[demo] config -> {paths['config']}")
    return paths


def write_data(train: list[dict], val: list[dict], paths: dict[str, Path]) -> None:
    """The train pairs with NeMo Aligner keys, the validation pairs with TRL keys."""
    write_jsonl(paths["train"], train)
    trl = [
        {"prompt": p["prompt"], "chosen": p["chosen_response"], "rejected": p["rejected_response"]}
        for p in val
    ]
    write_jsonl(paths["validation"], trl)
    print(
        f"[demo] {len(train)} train pairs (NeMo keys), {len(val)} validation pairs (TRL keys) -> "
        f"{paths['train'].parent}"
    )


def write_base_model(train: list[dict], path: Path, seed: int) -> None:
    """A byte-level BPE trained on the train texts and a tiny Llama over it, saved at `path`."""
    texts = (p[k] for p in train for k in ("prompt", "chosen_response", "rejected_response"))
    tokenizer = train_tokenizer(texts, vocab_size=512)
    model = build_tiny_model(
        "llama",
        len(tokenizer),
        hidden_size=128,
        num_layers=2,
        num_heads=4,
        max_position_embeddings=256,
        seed=seed,
    )
    save_tiny(model, tokenizer, path)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[demo] tokenizer ({len(tokenizer)} tokens) + tiny llama ({n_params / 1e3:.0f}k params) -> {path}")


def demo_config(paths: dict[str, Path], output_dir: Path, seed: int) -> dict:
    """The demo run's settings: two epochs of the demo data on the base model, validated every 50 steps."""
    return {
        "output_dir": str(output_dir),
        "model": {"path": str(paths["model"]), "dtype": "float32"},
        "data": {
            "train": str(paths["train"]),
            "validation": str(paths["validation"]),
            "max_seq_length": 96,
            "micro_batch_size": 32,
            "global_batch_size": 32,
            "seed": seed,
        },
        "dpo": {"ref_policy_kl_penalty": 0.1, "preference_loss": "dpo", "sft_loss_weight": 0.02},
        "optim": {"lr": 1.0e-3, "weight_decay": 0.0, "sched": {"warmup_steps": 10, "min_lr": 1.0e-4}},
        "trainer": {
            "max_epochs": 2,
            "max_steps": -1,
            "val_check_interval": 50,
            "save_interval": 500,
            "limit_val_batches": 1.0,
            "gradient_clip_val": 1.0,
            "samples": {"num_prompts": 64, "max_new_tokens": 40},
            "judge_prompts": 64,  # the same 64 generations, judged by rule_reward against the step-0 model's
        },
        "judge": {"function": "preftune.tools.demo:rule_reward"},
    }


def online_demo_config(demo_dir: Path, checkpoint: Path) -> Path:
    """The config of ``preftune demo --online``: online DPO from the offline demo's ``checkpoint``, on the
    demo's train prompts, judged by ``rule_reward``; greedy samples of 64 held-out prompts at each validation."""
    demo_dir = Path(demo_dir).resolve()
    config = OmegaConf.load(demo_dir / "demo.yaml")
    config.output_dir = str(demo_dir / "run_online")
    config.model.path = str(checkpoint)
    config.data.global_batch_size = 16
    config.data.micro_batch_size = 32
    # no SFT term: the best of the policy's samples is rarely a correct list; imitating it hurt (measured)
    config.dpo = {"ref_policy_kl_penalty": 0.1, "preference_loss": "dpo", "sft_loss_weight": 0.0}
    config.optim = {"lr": 1.0e-4, "weight_decay": 0.0, "sched": {"warmup_steps": 5, "min_lr": 5.0e-5}}
    config.trainer.max_epochs = None
    config.trainer.max_steps = 100
    config.trainer.val_check_interval = 50
    config.online = {
        "enabled": True,
        "num_generations": 8,
        "max_new_tokens": 40,
        # the offline checkpoint is far from sharp (its greedy tokens average probability ~0.3): at 0.5 and
        # above most samples are broken words and training on their pairs lowered the reward (measured)
        "temperature": 0.2,
        "top_k": 20,
        "missing_eos_penalty": 0.5,
    }
    config.judge = {"function": "preftune.tools.demo:rule_reward"}
    path = demo_dir / "demo_online.yaml"
    OmegaConf.save(config, path)
    print(f"[demo] online config -> {path}")
    return path


def rule_share(samples_path: Path) -> dict[int, float]:
    """Per validation step, the share of the sampled generations that obey the prompt's rule."""
    by_step: dict[int, list[bool]] = {}
    for line in Path(samples_path).read_text().splitlines():
        sample = json.loads(line)
        by_step.setdefault(sample["step"], []).append(obeys_rule(sample["prompt"], sample["generation"]))
    return {step: sum(ok) / len(ok) for step, ok in sorted(by_step.items())}
