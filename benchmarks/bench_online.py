"""Online DPO, preftune against TRL 1.16's ``trl.experimental.online_dpo.OnlineDPOTrainer``, on CPU.

Both start from the offline demo's last checkpoint (``preftune demo`` runs first if ``--demo-dir`` has none),
take the demo's train prompts in the same order, sample K = 2 completions per prompt (temperature 1, the
same ``--max-new-tokens``), score them with the same reward function (the demo's rule,
``preftune.tools.demo:rule_reward``), and train the sigmoid DPO loss (beta 0.1) for the same steps of the same
number of prompts with the same optimizer (AdamW, betas 0.9/0.999, no decay, cosine to 0, clip 1.0).
Measured: each whole run's wall time (model loading included) and the final policy's greedy reward and rule
share on held-out prompts, both scored by the same greedy decoding. One JSON object out.

    python benchmarks/bench_online.py --demo-dir runs/demo --steps 40 --json bench_online.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from preftune.cli import main as preftune_main
from preftune.config_checks import load_config
from preftune.data.sources import resolve_sources
from preftune.modeling.generation import HFGenerator, SamplingSettings
from preftune.recipe import train
from preftune.tools.demo import obeys_rule, rule_reward
from preftune.training.checkpoint import Checkpointer


def offline_checkpoint(demo_dir: Path) -> Path:
    """The offline demo's last checkpoint's model directory (the demo run first where there is none)."""
    if Checkpointer(demo_dir / "run").latest() is None:
        preftune_main(["demo", "--output-dir", str(demo_dir)])
    return Checkpointer(demo_dir / "run").latest() / "model"


def prompts_of(path: Path, key: str, n: int | None = None) -> list[str]:
    records = (record[key] for _, record in resolve_sources(str(path))[0].records())
    seen: dict[str, None] = {}
    for prompt in records:
        seen.setdefault(prompt)
    return list(seen)[:n]


def greedy_score(model_dir: Path, prompts: list[str], max_new_tokens: int) -> dict[str, float]:
    """Mean ``rule_reward`` and the rule share of greedy completions of ``prompts``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    eos = tokenizer.eos_token_id
    generator = HFGenerator(
        model, SamplingSettings(max_new_tokens, temperature=0), stop_ids=[eos], pad_id=eos
    )
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    out = generator.generate(ids, [0] * len(ids), 1)
    texts = [tokenizer.decode(group[0].ids, skip_special_tokens=True) for group in out]
    rewards = rule_reward(prompts, texts)
    return {
        "greedy_reward": sum(rewards) / len(rewards),
        "greedy_rule_share": sum(obeys_rule(p, t) for p, t in zip(prompts, texts, strict=True)) / len(texts),
    }


def run_preftune(args: argparse.Namespace, start: Path, train_file: Path, out: Path) -> Path:
    cfg = load_config(
        None,
        [
            f"model.path={start}",
            f"data.train={train_file}",
            f"output_dir={out}",
            "data.max_seq_length=96",
            f"data.global_batch_size={args.batch}",
            f"data.micro_batch_size={args.batch}",
            "data.seed=0",
            "online.enabled=true",
            "online.num_generations=2",
            f"online.max_new_tokens={args.max_new_tokens}",
            "judge.function=preftune.tools.demo:rule_reward",
            "dpo.ref_policy_kl_penalty=0.1",
            f"optim.lr={args.lr}",
            "optim.betas=[0.9,0.999]",
            "optim.sched.warmup_steps=0",
            f"trainer.max_steps={args.steps}",
            "trainer.max_epochs=null",
            "trainer.val_before_training=false",
            f"trainer.save_interval={args.steps}",
            f"trainer.val_check_interval={args.steps}",
        ],
    )
    train(cfg)
    return out / "checkpoints" / f"step_{args.steps}" / "model"


def run_trl(args: argparse.Namespace, start: Path, prompts: list[str], out: Path) -> Path:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(start)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(start, dtype=torch.float32)
    config = OnlineDPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=[0.1],
        loss_type="sigmoid",
        max_new_tokens=args.max_new_tokens,
        temperature=1.0,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=args.steps,
        seed=0,
        dataloader_num_workers=0,
    )
    trainer = OnlineDPOTrainer(
        model=model,
        reward_funcs=[rule_reward],
        args=config,
        train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    return out / "model"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-dir", default="runs/demo", type=Path)
    parser.add_argument("--work-dir", default="runs/bench_online", type=Path)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8, help="prompts per step")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--held-out", type=int, default=128, help="validation prompts scored greedily")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    start = offline_checkpoint(args.demo_dir)
    train_file = args.demo_dir / "data" / "train.jsonl"
    held_out = prompts_of(args.demo_dir / "data" / "validation.jsonl", "prompt", args.held_out)
    result: dict = {
        "steps": args.steps,
        "prompts_per_step": args.batch,
        "num_generations": 2,
        "max_new_tokens": args.max_new_tokens,
        "threads": torch.get_num_threads(),
        "start": greedy_score(start, held_out, args.max_new_tokens),
    }

    tick = time.perf_counter()
    preftune_model = run_preftune(args, start, train_file, args.work_dir / "preftune")
    result["preftune"] = {"wall_s": time.perf_counter() - tick}
    # the same distinct prompts; each trainer draws its steps x batch of them in its own shuffled order
    tick = time.perf_counter()
    trl_model = run_trl(args, start, prompts_of(train_file, "prompt"), args.work_dir / "trl")
    result["trl"] = {"wall_s": time.perf_counter() - tick}
    result["preftune"].update(greedy_score(preftune_model, held_out, args.max_new_tokens))
    result["trl"].update(greedy_score(trl_model, held_out, args.max_new_tokens))
    result["trl_over_preftune_wall"] = result["trl"]["wall_s"] / result["preftune"]["wall_s"]
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
