"""The router's load-balancing loss of mixture-of-experts policies (Mixtral, Qwen-MoE, gpt-oss).

Switch Transformer's loss, as transformers' ``load_balancing_loss_func`` computes it: over every (MoE layer,
token) routing, E · Σ_e f_e · P_e, with f_e the fraction of top-k assignments to expert e and P_e its mean
router probability. Here each token carries a weight, how many tokens of the padded layout it stands for
(0 for padding, 2 for a shared prompt, else 1), so the packed and shared-prompt layouts balance exactly the
token set of the padded one, and padding never enters it (transformers would count it: preftune runs padded
rows without an attention mask). Only the policy adds it; the reference's router never does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PretrainedConfig

from preftune.errors import ConfigError


@dataclass(frozen=True)
class RouterLoss:
    """The balancing loss of a model with ``num_experts`` experts, ``top_k`` per token, weighted ``coef``."""

    num_experts: int
    top_k: int
    coef: float

    def __call__(self, router_logits: Sequence[Tensor], token_weights: Tensor) -> Tensor:
        """The loss from each MoE layer's [tokens, experts] router logits and the [R, L] token weights."""
        weights = token_weights.reshape(-1).float()
        assigned = torch.zeros(self.num_experts, device=weights.device)
        probability = torch.zeros(self.num_experts, device=weights.device)
        for logits in router_logits:
            probs = logits.float().softmax(-1)
            chosen = probs.topk(self.top_k, dim=-1).indices
            assigned = assigned.index_add(0, chosen.reshape(-1), weights.repeat_interleave(self.top_k))
            probability = probability + (probs * weights[:, None]).sum(0)
        rows = weights.sum() * len(router_logits)
        return self.num_experts * (assigned / rows * probability / rows).sum()


def router_loss(config: PretrainedConfig, coef: float | None) -> RouterLoss | None:
    """The policy's balancing loss: ``coef`` (``model.router_aux_loss_coef``; None: the model config's
    ``router_aux_loss_coef``), or None for a dense model or a coefficient of 0."""
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    is_moe = (
        bool(experts) and hasattr(config, "num_experts_per_tok") and hasattr(config, "router_aux_loss_coef")
    )
    if not is_moe:
        if coef:
            raise ConfigError(
                f"model.router_aux_loss_coef={coef}: this {config.model_type} model has no router; leave it null"
            )
        return None
    coef = config.router_aux_loss_coef if coef is None else coef
    return RouterLoss(int(experts), int(config.num_experts_per_tok), float(coef)) if coef else None
