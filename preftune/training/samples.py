"""Sample generations at validation: the policy answers the first N validation prompts greedily, rendered
exactly as in training (the tokenized prompt, chat template included), and each sample goes to
``output_dir/samples.jsonl`` and to the trackers. The RNG state is left untouched, so the training
trajectory is the same with samples on or off. Every rank generates (under FSDP2 each forward is a
collective); only rank 0 writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig

from preftune.modeling.generation import unsharded_root
from preftune.modeling.model import DPOModel, causal_lm
from preftune.run_dir import RunDir


@torch.no_grad()
def generate_samples(
    model: DPOModel, tokenizer: Any, examples: list[dict[str, Any]], max_new_tokens: int, step: int
) -> list[dict[str, Any]]:
    """One record per example: step, prompt, the data's chosen response, the greedy generation, its tokens."""
    lm = causal_lm(model.policy)
    device = model.device
    # Exactly max_new_tokens forwards per prompt on every rank (no stop at EOS: the generation is cut at
    # its first EOS afterwards), so the ranks' FSDP2 collectives always match.
    settings = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=tokenizer.eos_token_id
    )
    rows = []
    was_training = lm.training
    lm.train(False)
    forked = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
    with forked, unsharded_root(model.policy_logprobs):
        for example in examples:
            prompt = torch.tensor([example["prompt_ids"]], device=device)
            output = lm.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=settings)
            generated = output[0, prompt.shape[1] :].tolist()
            if tokenizer.eos_token_id in generated:
                generated = generated[: generated.index(tokenizer.eos_token_id)]
            rows.append(
                {
                    "step": step,
                    "prompt": tokenizer.decode(example["prompt_ids"], skip_special_tokens=True),
                    "chosen": tokenizer.decode(example["chosen_ids"], skip_special_tokens=True),
                    "generation": tokenizer.decode(generated, skip_special_tokens=True),
                    "num_tokens": len(generated),
                }
            )
    lm.train(was_training)
    return rows


def append_samples(output_dir: str | Path, rows: list[dict[str, Any]]) -> None:
    with RunDir(output_dir).samples.open("a") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def truncate_samples_after(output_dir: str | Path, step: int) -> None:
    """On resume from ``step``, drop the samples the interrupted run wrote after it (as ``metrics.jsonl``)."""
    truncate_records_after(RunDir(output_dir).samples, step)


def truncate_records_after(path: Path, step: int) -> None:
    """Drop the JSON lines of ``path`` whose ``step`` is after ``step`` (samples, online generations)."""
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))
