"""Sampling completions from the policy: one small ``Generator`` interface and its Hugging Face implementation.

``HFGenerator`` decodes every prompt x K rows of a rank in one batch with a KV cache: the prompts are left
padded (attention mask + position ids), each step runs the model on one new token per row and keeps only the
last position's logits. The policy's own weights are used in place (no copy), in eval mode under no_grad;
its train mode is restored afterwards.

Sampling never touches the global RNG: each prompt's K rows draw their uniforms from a ``torch.Generator``
seeded by ``prompt_seed(data seed, step, the prompt's index in the data)``, and a token is picked by inverse
CDF over the (temperature, top-k, top-p filtered) distribution sorted by probability. What a prompt gets
therefore depends neither on the number of ranks, nor on the other prompts of its batch (up to the float
rounding of a batched forward, which tests show does not change a sample), nor on a resume.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule

from preftune.data.visibility import VARLEN
from preftune.modeling.logprobs import causal_lm
from preftune.modeling.parallel import DistInfo, any_rank


@dataclass(frozen=True)
class SamplingSettings:
    """How completions are drawn (``online.max_new_tokens``, ``temperature``, ``top_p``, ``top_k``)."""

    max_new_tokens: int
    temperature: float = 1.0  # 0: greedy (argmax)
    top_p: float = 1.0  # nucleus: the smallest set of most likely tokens holding this much probability
    top_k: int = 0  # only the k most likely tokens (0: all)


@dataclass(frozen=True)
class Completion:
    """One generated completion: its token ids (the stop token included when it ended) as the policy made
    them, appended to the prompt's ids unchanged."""

    ids: list[int]
    ended: bool  # False: cut at max_new_tokens without a stop token


class Generator(Protocol):
    """Anything that samples K completions per prompt (the HF model below; a vLLM engine could be another)."""

    def generate(
        self, prompts: Sequence[list[int]], seeds: Sequence[int], num_per_prompt: int
    ) -> list[list[Completion]]:
        """``num_per_prompt`` completions of each prompt (token ids), the i-th prompt's drawn from ``seeds[i]``."""
        ...


def prompt_seed(data_seed: int, step: int, index: int) -> int:
    """The seed of one prompt's completions at one step: a hash of (data seed, step, prompt index)."""
    digest = hashlib.sha256(f"{data_seed}/{step}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def sample_tokens(logits: Tensor, uniforms: Tensor, settings: SamplingSettings) -> Tensor:
    """[B] next tokens from [B, V] logits: greedy at temperature 0, else the first token (by falling
    probability, after top-k and top-p) whose cumulative probability exceeds ``uniforms`` [B] x the total."""
    if settings.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / settings.temperature, dim=-1)
    probs, order = probs.sort(dim=-1, descending=True, stable=True)
    if settings.top_k > 0:
        probs[:, settings.top_k :] = 0.0
    if settings.top_p < 1.0:  # keep a token while the mass before it is below top_p (the first always)
        probs = probs * ((probs.cumsum(-1) - probs) < settings.top_p)
    cumulative = probs.cumsum(-1)
    choice = (cumulative < uniforms[:, None] * cumulative[:, -1:]).sum(-1).clamp(max=probs.shape[-1] - 1)
    return order.gather(-1, choice[:, None]).squeeze(-1)


@contextlib.contextmanager
def unsharded_root(root: nn.Module) -> Iterator[None]:
    """Under FSDP2 a generation calls the causal LM below the sharded root (embeddings, head): gather the
    root's parameters for the duration; the blocks gather their own in their forwards, as in training."""
    if isinstance(root, FSDPModule):
        # FSDP2 picks its root at the first forward: make it the root before the blocks run on their own
        # (a generation before any training or validation step), else the next root forward fails.
        root._get_fsdp_state()._lazy_init()
        root.unshard()
        try:
            yield
        finally:
            root.reshard()
    else:
        yield


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode (dropout off) for the duration; its train mode restored after."""
    was_training = model.training
    model.train(False)
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def masked_attention(lm: nn.Module) -> Iterator[None]:
    """``preftune_varlen`` (packed rows) reads attention blocks, not the padding mask and KV cache that decoding
    needs: the model runs SDPA for the duration (the weights are the same)."""
    current = lm.config._attn_implementation
    if current != VARLEN:
        yield
        return
    lm.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        lm.set_attn_implementation(current)


class HFGenerator:
    """Batched KV-cache sampling with a Hugging Face causal LM (the policy itself, weights in place).

    ``root`` is the module the trainer runs (FSDP2-sharded or DDP-wrapped); under FSDP2 each forward is a
    collective, so every rank runs the same number of decoding steps: until every rank's rows have stopped
    (a done flag all-reduced per step) or ``max_new_tokens``.
    """

    def __init__(
        self,
        model: nn.Module,
        settings: SamplingSettings,
        *,
        stop_ids: Sequence[int],
        pad_id: int,
        root: nn.Module | None = None,
        dist: DistInfo | None = None,
    ):
        self.model = model
        self.settings = settings
        self.stop_ids = sorted(set(stop_ids))
        self.pad_id = pad_id
        self.root = root if root is not None else model
        self.dist = dist or DistInfo()

    @torch.no_grad()
    def generate(
        self, prompts: Sequence[list[int]], seeds: Sequence[int], num_per_prompt: int
    ) -> list[list[Completion]]:
        lm = causal_lm(self.model)
        with eval_mode(self.model), masked_attention(lm), unsharded_root(self.root):
            ids, ended = self._decode(lm, prompts, seeds, num_per_prompt)
        out = []
        for row, (tokens, done) in enumerate(zip(ids, ended, strict=True)):
            if row % num_per_prompt == 0:
                out.append([])
            out[-1].append(Completion(tokens, done))
        return out

    def _decode(
        self, lm: nn.Module, prompts: Sequence[list[int]], seeds: Sequence[int], k: int
    ) -> tuple[list[list[int]], list[bool]]:
        device = next(lm.parameters()).device
        rows = [p for p in prompts for _ in range(k)]
        width = max(len(p) for p in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, p in enumerate(rows):  # left padding: every prompt ends at the last column
            input_ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        steps = self.settings.max_new_tokens
        uniforms = torch.cat(
            [torch.rand(k, steps, generator=torch.Generator().manual_seed(seed)) for seed in seeds]
        ).to(device)
        input_ids, mask = input_ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        stop = torch.tensor(self.stop_ids, device=device)
        done = torch.zeros(len(rows), dtype=torch.bool, device=device)
        generated = []
        cache = None
        for t in range(steps):
            out = lm(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=positions,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            cache = out.cache
            tokens = sample_tokens(out.logits[:, -1], uniforms[:, t], self.settings)
            tokens = torch.where(done, torch.full_like(tokens, -1), tokens)  # -1: after the stop
            generated.append(tokens)
            done = done | torch.isin(tokens, stop)
            finished = bool(done.all())
            if self.dist.distributed:  # every rank joins each forward (FSDP2) until all are done
                finished = not any_rank(not finished, self.dist)
            if finished or t == steps - 1:
                break
            input_ids = torch.where(tokens >= 0, tokens, self.pad_id)[:, None]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
        table = torch.stack(generated, dim=1).tolist() if generated else [[] for _ in rows]
        ids = [[token for token in row if token >= 0] for row in table]
        ended = [bool(row) and row[-1] in self.stop_ids for row in ids]
        return ids, ended
