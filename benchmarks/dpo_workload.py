"""The benchmark's workload: the models, the synthetic pairs, the batch order, the preftune modes, and each
step's real tokens and useful FLOPs (the definitions are in ``bench_dpo``'s docstring)."""

from __future__ import annotations

import json
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PAIRS_PER_STEP = 8
BETA = 0.1
LR = 1e-6
MAX_LENGTH = 1024
DATA_SEED = 1234  # preftune's data.seed: the sampler order TRL is given too
MODELS = {
    "small": {"vocab_size": 4096, "warmup": 2, "steps": 5},
    "bigvocab": {"vocab_size": 128_256, "warmup": 1, "steps": 2},
}
ARCH = {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "intermediate_size": 720}
# preftune modes: the config overrides of each (all keys must exist in preftune's default config).
MODES = {
    "padded": [],
    "grouped": ["data.micro_batch_size=2"],  # the same 8 pairs a step, in length-grouped micro-batches of 2
    "precompute": ["reference.mode=precompute"],
    "bf16_autocast": ["model.autocast=bfloat16"],
    "compile": ["model.compile=true"],
    "activation_checkpointing": ["model.activation_checkpointing=true"],
    # packed and shared-prompt rows run segment-wise attention (preftune_varlen) unless an attention is named
    "packed": ["data.packing=true"],
    "packed_masks": ["data.packing=true", "model.attn_implementation=sdpa"],  # one dense mask per row
    "share_prompt": ["data.share_prompt=true"],
    "packed_share_prompt": ["data.packing=true", "data.share_prompt=true"],
    # the switches combined: speed (prompt once, reference cached) and memory (plus activation checkpointing)
    "fast": ["data.share_prompt=true", "reference.mode=precompute", "data.micro_batch_size=2"],
    "lean": [
        "data.share_prompt=true",
        "reference.mode=precompute",
        "data.micro_batch_size=2",
        "model.activation_checkpointing=true",
    ],
}
DEFAULT_MODES = {
    "small": list(MODES),
    "bigvocab": ["padded", "grouped", "precompute", "fast", "lean"],
}


def available_modes() -> tuple[set[str], dict[str, str]]:
    """The modes whose config keys exist in preftune's default config, and why the others are skipped."""
    from omegaconf import OmegaConf

    from preftune.config import default_config

    cfg = default_config()
    absent = object()
    ok, skipped = set(), {}
    for mode, overrides in MODES.items():
        keys = [o.split("=", 1)[0] for o in overrides]
        missing = [k for k in keys if OmegaConf.select(cfg, k, default=absent) is absent]
        if missing:
            skipped[mode] = f"skipped: preftune's config has no {', '.join(missing)}"
        else:
            ok.add(mode)
    return ok, skipped


def make_lexicon(rng: random.Random, size: int = 20_000) -> list[str]:
    onsets = ["", "b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z"]
    onsets += ["br", "ch", "cl", "dr", "fl", "gr", "pl", "sh", "st", "th", "tr"]
    nuclei = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "io"]
    codas = ["", "", "n", "r", "s", "t", "l", "m", "nd", "st"]
    syllables = [o + v + c for o in onsets for v in nuclei for c in codas]
    words: set[str] = set()
    while len(words) < size:
        words.add("".join(rng.choice(syllables) for _ in range(rng.choice((1, 1, 2, 2, 2, 3, 3, 4)))))
    out = sorted(words)
    rng.shuffle(out)
    return out


class TextGen:
    """Zipf-distributed pseudo-words with light punctuation (deterministic from the seed)."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.words = make_lexicon(self.rng)
        weights = [1.0 / (rank + 2) for rank in range(len(self.words))]
        self.cum = []
        total = 0.0
        for w in weights:
            total += w
            self.cum.append(total)

    def sentence_words(self, n: int) -> str:
        words = self.rng.choices(self.words, cum_weights=self.cum, k=n)
        out = []
        for i, w in enumerate(words):
            out.append(w)
            if i < n - 1 and self.rng.random() < 0.08:
                out[-1] += self.rng.choice((",", ".", ";"))
        return " ".join(out)

    def pair(self) -> dict[str, str]:
        rng = self.rng
        prompt = self.sentence_words(rng.randint(40, 200)) + "?"
        # Responses start with a space and the prompt ends with "?", so prompt + response tokenizes as the
        # concatenation of the two (TRL tokenizes the joined text; preftune the parts).
        chosen = " " + self.sentence_words(rng.randint(20, 200)) + "."
        rejected = " " + self.sentence_words(rng.randint(20, 200)) + "."
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def build_model_dir(
    name: str, vocab_size: int, pairs: list[dict[str, str]], corpus: list[str], out: Path
) -> dict[str, Any]:
    """Tokenizer (trained on the corpus and the pairs) and model, saved to ``out``; returns their sizes."""
    from preftune.tools.tiny import build_tiny_model, save_tiny, train_tokenizer

    texts = corpus + [p[k] for p in pairs for k in ("prompt", "chosen", "rejected")]
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    model = build_tiny_model(
        "llama",
        vocab_size,
        hidden_size=ARCH["hidden_size"],
        num_layers=ARCH["num_layers"],
        num_heads=ARCH["num_heads"],
        intermediate_size=ARCH["intermediate_size"],
        max_position_embeddings=MAX_LENGTH,
        seed=0,
    )
    save_tiny(model, tokenizer, out)
    config = model.config
    body = sum(p.numel() for n, p in model.model.layers.named_parameters() if p.ndim >= 2)
    head = model.get_output_embeddings().weight.numel()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    info = {
        "name": name,
        "path": str(out),
        "params": sum(p.numel() for p in model.parameters()),
        "body_matmul_params": body,
        "lm_head_params": head,
        "vocab_size": config.vocab_size,
        "tokenizer_vocab_size": len(tokenizer),
        "hidden_size": config.hidden_size,
        "num_layers": config.num_hidden_layers,
        "attention_dim": config.num_attention_heads * head_dim,
        **{k: v for k, v in ARCH.items() if k not in ("hidden_size", "num_layers")},
    }
    del model
    return info


def pair_lengths(model_dir: Path, pairs: list[dict[str, str]]) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) token counts of each pair, tokenized as preftune does."""
    from transformers import AutoTokenizer

    from preftune.data.tokenize import PairTokenizer

    pair_tokenizer = PairTokenizer(AutoTokenizer.from_pretrained(model_dir), MAX_LENGTH)
    out = []
    for i, pair in enumerate(pairs):
        ex = pair_tokenizer({**pair, "chosen_reward": 1.0, "rejected_reward": 0.0})
        if isinstance(ex, str):
            raise RuntimeError(f"pair {i} was dropped by preftune's tokenizer: {ex}")
        out.append((len(ex["prompt_ids"]), len(ex["chosen_ids"]), len(ex["rejected_ids"])))
    return out


def batch_order(num_pairs: int) -> list[list[int]]:
    """The global batches preftune's sampler draws in epoch 0 (what TRL is given, in order)."""
    from preftune.data.sampler import GlobalBatchSampler

    sampler = GlobalBatchSampler(num_pairs, PAIRS_PER_STEP, seed=DATA_SEED, shuffle=True, drop_last=True)
    sampler.set_epoch(0)
    return list(sampler)


def step_workload(lengths: list[tuple[int, int, int]], batches: list[list[int]], model: dict) -> list[dict]:
    """Real tokens and useful FLOPs (see the module docstring) of each step's batch: ``flops`` for the standard
    workload, ``flops_shared``/``flops_precompute``/``flops_shared_precompute`` for the work that a shared
    prompt, a cached reference or both leave to do (the strict MFU's numerator)."""
    n_body, n_head = model["body_matmul_params"], model["lm_head_params"]
    attn = model["num_layers"] * model["attention_dim"]

    def flops(batch: list[int], share_prompt: bool, reference: bool) -> int:
        # (token, parameter) products and causal (query, key) pairs, x2 FLOPs per multiply-add: forward 2,
        # forward + backward 6; attention forward = 2 matmuls (QK^T, AV) over the pairs, D wide.
        tokens = responses = pairs = 0
        for i in batch:
            prompt, chosen, rejected = lengths[i]
            responses += chosen + rejected
            if share_prompt:  # prompt+chosen causal, rejected over the prompt and itself
                tokens += prompt + chosen + rejected
                pairs += (prompt + chosen) ** 2 / 2 + rejected * prompt + rejected**2 / 2
            else:
                tokens += 2 * prompt + chosen + rejected
                pairs += (prompt + chosen) ** 2 / 2 + (prompt + rejected) ** 2 / 2
        per_pass = n_body * tokens + n_head * responses + 2 * attn * pairs  # multiply-adds of one forward
        return round(2 * per_pass * (3 + (1 if reference else 0)))

    out = []
    for batch in batches:
        real = [lengths[i][0] + resp for i in batch for resp in lengths[i][1:]]
        out.append(
            {
                "tokens": sum(real),
                "max_len": max(real),
                "flops": flops(batch, share_prompt=False, reference=True),
                "flops_shared": flops(batch, share_prompt=True, reference=True),
                "flops_precompute": flops(batch, share_prompt=False, reference=False),
                "flops_shared_precompute": flops(batch, share_prompt=True, reference=False),
            }
        )
    return out


def performed_flops_key(overrides: list[str]) -> str:
    """The ``step_workload`` key of the FLOPs a run with these overrides performs (its strict MFU)."""
    shared, cached = "data.share_prompt=true" in overrides, "reference.mode=precompute" in overrides
    return "flops" + "_shared" * shared + "_precompute" * cached


@dataclass
class Workload:
    """One model's benchmark inputs: its directory and pairs file, the global batches in order, each step's
    tokens and FLOPs (``step_workload``), and the sizes reported under ``models``."""

    model_dir: Path
    data_path: Path
    batches: list[list[int]]
    work: list[dict]
    info: dict[str, Any]


def build_workload(name: str, workdir: Path, seed: int, warmup: int, steps: int) -> Workload:
    """Pairs, tokenizer and model for ``name`` under ``workdir`` (the same text for both models; each has its
    own tokenizer), and what every step of the run will train on."""
    num_pairs = (warmup + steps) * PAIRS_PER_STEP
    gen = TextGen(seed)
    pairs = [gen.pair() for _ in range(num_pairs)]
    corpus = [gen.sentence_words(100) for _ in range(3000)]
    model_dir = workdir / name / "model"
    t0 = time.perf_counter()
    info = build_model_dir(name, MODELS[name]["vocab_size"], pairs, corpus, model_dir)
    data_path = workdir / name / "pairs.jsonl"
    data_path.write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    lengths = pair_lengths(model_dir, pairs)
    batches = batch_order(num_pairs)
    work = step_workload(lengths, batches, info)
    info.update(
        num_pairs=num_pairs,
        warmup_steps=warmup,
        counted_steps=steps,
        build_s=round(time.perf_counter() - t0, 1),
        mean_prompt_tokens=round(statistics.mean(x[0] for x in lengths), 1),
        mean_response_tokens=round(statistics.mean(x[i] for x in lengths for i in (1, 2)), 1),
        max_sequence_tokens=max(w["max_len"] for w in work),
        tokens_per_step=[w["tokens"] for w in work],
        flops_per_step=[w["flops"] for w in work],
    )
    return Workload(model_dir, data_path, batches, work, info)
