"""Greedy generations at validation: the policy answers the first N validation prompts greedily, rendered
exactly as in training (the tokenized prompt, chat template included); each sample goes to
``output_dir/samples.jsonl`` and to the trackers (judged validation scores the same generations). The RNG
state is left untouched, so the training trajectory is the same with samples on or off. Every rank
generates (under FSDP2 each forward is a collective); only rank 0 writes."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig

from preftune.modeling.generation import masked_attention, unsharded_root


def decode_generation(tokenizer: Any, ids: list[int]) -> str:
    """A generation's text, without the broken character a cut multi-byte UTF-8 sequence leaves at its end
    (a byte-level tokenizer's generation can stop inside one: decoded, it ends in U+FFFD)."""
    return tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd")


@torch.no_grad()
def greedy_generate(
    lm: torch.nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_id: int,
    *,
    root: torch.nn.Module | None = None,
) -> list[list[int]]:
    """Each prompt's greedy continuation by the causal LM ``lm``, cut before its first EOS, in eval mode
    and without touching the RNG. ``root``: the FSDP2-sharded module above ``lm`` whose parameters are
    gathered for the duration (see ``unsharded_root``)."""
    device = next(lm.parameters()).device
    # Exactly max_new_tokens forwards per prompt on every rank (no stop at EOS: the generation is cut at
    # its first EOS afterwards), so the ranks' FSDP2 collectives always match.
    settings = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=eos_id
    )
    generations = []
    was_training = lm.training
    lm.train(False)
    forked = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
    root_gathered = unsharded_root(root) if root is not None else contextlib.nullcontext()
    with forked, root_gathered, masked_attention(lm):
        for prompt_ids in prompts:
            prompt = torch.tensor([prompt_ids], device=device)
            output = lm.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=settings)
            generated = output[0, prompt.shape[1] :].tolist()
            generations.append(generated[: generated.index(eos_id)] if eos_id in generated else generated)
    lm.train(was_training)
    return generations


def sample_rows(
    tokenizer: Any, examples: list[dict[str, Any]], generations: list[list[int]], step: int
) -> list[dict[str, Any]]:
    """One ``samples.jsonl`` record per example: step, prompt, the data's chosen response, the greedy
    generation, its tokens."""
    return [
        {
            "step": step,
            "prompt": tokenizer.decode(example["prompt_ids"], skip_special_tokens=True),
            "chosen": tokenizer.decode(example["chosen_ids"], skip_special_tokens=True),
            "generation": decode_generation(tokenizer, generated),
            "num_tokens": len(generated),
        }
        for example, generated in zip(examples, generations, strict=True)
    ]


def append_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("a") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def truncate_jsonl_after(path: Path, step: int) -> None:
    """On resume from ``step``, drop the records (``samples.jsonl``, ``judged.jsonl``) the interrupted run
    wrote after it (as ``metrics.jsonl``)."""
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))
