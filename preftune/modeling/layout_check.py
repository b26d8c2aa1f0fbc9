"""The self-check before training packed or with a shared prompt: is the layout exact for this very model?

A few short pairs go through the model twice: in the configured layout (packed and/or shared prompt, with the
configured attention) and as separate sequences, one forward each under the model's own eager attention. Every
sequence's response log-probs must agree within the compute dtype's tolerance, or training stops with one line
naming the sequence and the difference. This proves what ``preftune.data.windows`` cannot read from a
config: that the model's attention goes through transformers' interface, takes the layout's keywords (segment
blocks or per-layer masks), sinks and soft-capping included, in all layers. It takes a few forwards of a few
tokens; a pass is cached in ``output_dir/cache/layout_check`` under a fingerprint of the model files, dtype and
layout, so later runs skip it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from transformers import PretrainedConfig

from preftune.data.batch import dpo_custom_collate, micro_batch_from_padded
from preftune.data.packing import build_packed_collate
from preftune.errors import ConfigError
from preftune.modeling.logprobs import causal_lm
from preftune.modeling.model import DPOModel
from preftune.modeling.parallel import any_rank, reshard

CHECK_VERSION = 1
# (prompt, chosen, rejected) lengths: an empty prompt and one-token responses, the edge cases of the layout
PAIR_LENGTHS = ((5, 4, 3), (0, 3, 5), (6, 1, 1), (2, 6, 2))
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.25, torch.float16: 0.1}  # nats per response token


def check_pairs(config: PretrainedConfig, seed: int = 0) -> list[dict]:
    """Short pairs of random token ids below the vocabulary size, with the layout's edge cases."""
    generator = torch.Generator().manual_seed(seed)

    def tokens(n: int) -> list[int]:
        return torch.randint(0, config.vocab_size, (n,), generator=generator).tolist()

    return [
        {"prompt_ids": tokens(p), "chosen_ids": tokens(c), "rejected_ids": tokens(r),
         "chosen_reward": 1.0, "rejected_reward": 0.0, "index": i}
        for i, (p, c, r) in enumerate(PAIR_LENGTHS)
    ]  # fmt: skip


def fingerprint(model_path: str | Path, dtype: str, layout: str) -> str | None:
    """Key of a check's result: the model directory's config and weight files (names, sizes, times), the
    dtype and the layout; None when ``model_path`` is not a local directory (the check then always runs)."""
    root = Path(model_path)
    if not root.is_dir():
        return None
    h = hashlib.sha256(json.dumps([CHECK_VERSION, dtype, layout]).encode())
    for path in sorted(
        p for p in root.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors", ".bin")
    ):
        stat = path.stat()
        h.update(json.dumps([path.name, stat.st_size, stat.st_mtime_ns]).encode())
    h.update((root / "config.json").read_bytes() if (root / "config.json").is_file() else b"")
    return h.hexdigest()[:24]


def layout_error(model: DPOModel, *, pack: bool, share_prompt: bool) -> str | None:
    """What differs between the layout and separate eager forwards (one line), or None when they agree."""
    lm = causal_lm(model.policy)
    config, implementation = lm.config, lm.config._attn_implementation
    pairs = check_pairs(config)
    eos = config.eos_token_id if isinstance(config.eos_token_id, int) else 0
    collate = build_packed_collate(
        eos_id=eos,
        model_config=config,
        attn_implementation=implementation,
        pack=pack,
        share_prompt=share_prompt,
        max_tokens_per_row=sum(len(v) for ex in pairs for k, v in ex.items() if k.endswith("_ids")) * 2,
        rows_per_micro_batch=len(pairs),
        device=model.device,
    )
    training = model.policy.training
    model.policy.eval()
    try:
        with torch.no_grad():
            try:
                (batch,) = collate(pairs)
                laid_out, counts = model.policy_logprobs(batch)
            except Exception as error:  # the model's code refused the layout's keywords or masks
                first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                return f"its forward fails on the {implementation} layout ({first})"
            order = torch.cat([batch.indices, batch.indices + len(pairs)])
            lm.set_attn_implementation("eager")
            try:
                alone = torch.zeros(2 * len(pairs), device=laid_out.device)
                for ex in pairs:  # one sequence per forward: no padding, no mask, nothing to isolate
                    for side in ("chosen", "rejected"):
                        response = ex[f"{side}_ids"]  # as both responses: two equal rows, no padding
                        single = {**ex, "chosen_ids": response, "rejected_ids": response}
                        lp, _ = model.policy_logprobs(
                            micro_batch_from_padded(dpo_custom_collate([single], eos))
                        )
                        alone[ex["index"] + (len(pairs) if side == "rejected" else 0)] = lp[0]
            finally:
                lm.set_attn_implementation(implementation)
    finally:
        model.policy.train(training)
        reshard(model.policy_logprobs)
    expected = torch.zeros_like(alone)
    expected[order] = laid_out.float()
    tokens = torch.zeros_like(alone)
    tokens[order] = counts.float()
    dtype = model.policy_runner.autocast or next(lm.parameters()).dtype
    error = (expected - alone).abs()
    worst = int((error / tokens.clamp(min=1)).argmax())
    if error[worst] <= TOLERANCE.get(dtype, 0.25) * tokens[worst].clamp(min=1):
        return None
    side, pair = ("chosen", worst) if worst < len(pairs) else ("rejected", worst - len(pairs))
    return (
        f"pair {pair}'s {side} log-prob is {expected[worst].item():.4f} laid out but "
        f"{alone[worst].item():.4f} alone ({int(tokens[worst])} tokens)"
    )


def check_layout(
    model: DPOModel,
    *,
    pack: bool,
    share_prompt: bool,
    model_path: str | Path,
    dtype: str,
    cache_dir: Path | None,
) -> bool:
    """Raise ``ConfigError`` (one line) unless the layout is exact for ``model``; True when a cached pass was
    found, False when the check ran (and passed; the pass is then cached under ``cache_dir``). Over several
    ranks (``model.dist``) every rank calls it: rank 0 reads and writes the cache, and all run the check or
    none (a sharded model's forwards are collectives)."""
    lm = causal_lm(model.policy)
    info = model.dist
    layout = f"pack={pack} share_prompt={share_prompt} attention={lm.config._attn_implementation}"
    key = fingerprint(model_path, dtype, layout) if cache_dir is not None and info.is_main else None
    record = cache_dir / f"{key}.json" if key is not None else None
    if any_rank(record is not None and record.is_file(), info):
        return True
    error = layout_error(model, pack=pack, share_prompt=share_prompt)
    if error is not None:
        raise ConfigError(
            f"packing / shared prompt are not exact for this {lm.config.model_type} model: {error}; "
            "set data.packing=false and data.share_prompt=false"
        )
    if record is not None:
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp = record.with_suffix(".tmp")
        tmp.write_text(
            json.dumps({"model_type": lm.config.model_type, "layout": layout, "passed": True}) + "\n"
        )
        tmp.replace(record)
    return False
