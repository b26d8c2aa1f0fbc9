"""Sample generations at validation: the policy answers the first N validation prompts greedily, rendered
exactly as in training (the tokenized prompt, chat template included), and each sample goes to
``output_dir/samples.jsonl`` and to the trackers. The RNG state is left untouched, so the training
trajectory is the same with samples on or off. Every rank generates (under FSDP2 each forward is a
collective); only rank 0 writes."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.distributed.fsdp import FSDPModule
from transformers import GenerationConfig

from preftune.modeling.model import DPOModel, causal_lm
from preftune.run_dir import RunDir


@contextlib.contextmanager
def unsharded_root(model: DPOModel) -> Iterator[None]:
    """Under FSDP2 ``generate`` calls the causal LM below the sharded root (embeddings, head): gather the
    root's parameters for the duration; the blocks gather their own in their forwards, as in training."""
    root = model.policy_logprobs
    if isinstance(root, FSDPModule):
        root.unshard()
        try:
            yield
        finally:
            root.reshard()
    else:
        yield


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
    with forked, unsharded_root(model):
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
    path = RunDir(output_dir).samples
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))
