"""The router's load-balancing loss of mixture-of-experts policies (Mixtral, Qwen-MoE, gpt-oss).

Switch Transformer's loss, as transformers' ``load_balancing_loss_func`` computes it: over every (MoE layer,
token) routing, E · Σ_e f_e · P_e, with f_e the fraction of top-k assignments to expert e and P_e its mean
router probability. Here each token carries a weight, how many tokens of the padded layout it stands for
(0 for padding, 2 for a shared prompt, else 1), so the packed and shared-prompt layouts balance exactly the
token set of the padded one, and padding never enters it (transformers would count it: preftune runs padded
rows without an attention mask). Only the policy adds it; the reference's router never does.

``model.router_aux_loss_scope`` says over which tokens f and P are taken:

- ``micro_batch``: each micro-batch's own, as transformers does. The loss then depends on how the global
  batch is cut: the micro-batch size, packing, the shared prompt, the number of ranks.
- ``global_batch``: the whole global batch's, over micro-batches and ranks (Qwen's global-batch balancing,
  arXiv:2501.11873), so every layout and rank count trains the same objective. f is a count (no gradient)
  and P a sum over tokens, so the loss's gradient is Σ over micro-batches of E · Σ_e (A_e / R) · (p_e / R),
  p_e a micro-batch's own probability sums and A (assignments), R (routings) the global batch's: exact, once
  A and R are known. The trainer learns them first, from a forward of every micro-batch without gradients
  (``GlobalRouting``): one more policy forward per micro-batch, without lm-head (15–17% of a micro-batch's
  policy forward + backward + reference forward, measured on CPU; none when the global batch is one
  micro-batch on one rank).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PretrainedConfig

from preftune.errors import ConfigError

SCOPES = ("global_batch", "micro_batch")


@dataclass(frozen=True)
class RoutingStatistics:
    """Sums over a set of (MoE layer, token) routings, each token counted by its weight: top-k assignments
    per expert ([E], a count), router probabilities per expert ([E], differentiable) and routings (0-d)."""

    assigned: Tensor
    probability: Tensor
    routings: Tensor

    def __add__(self, other: RoutingStatistics) -> RoutingStatistics:
        return RoutingStatistics(
            self.assigned + other.assigned,
            self.probability + other.probability,
            self.routings + other.routings,
        )

    def detach(self) -> RoutingStatistics:
        return RoutingStatistics(self.assigned.detach(), self.probability.detach(), self.routings.detach())

    def as_vector(self) -> Tensor:
        """[2E + 1]: one tensor to sum over ranks in one collective (``from_vector`` reads it back)."""
        return torch.cat([self.assigned, self.probability, self.routings.reshape(1)])

    @staticmethod
    def from_vector(vector: Tensor) -> RoutingStatistics:
        num_experts = (vector.shape[0] - 1) // 2
        return RoutingStatistics(vector[:num_experts], vector[num_experts:-1], vector[-1])

    def balancing_loss(self) -> Tensor:
        """E · Σ_e f_e · P_e over these routings."""
        num_experts = self.assigned.shape[0]
        return num_experts * (self.assigned / self.routings * self.probability / self.routings).sum()


@dataclass(frozen=True)
class GlobalRouting:
    """``global_batch`` scope: the routing statistics of a whole global batch (every micro-batch, every
    rank) and its number of pairs, known before the micro-batches' gradient forwards."""

    statistics: RoutingStatistics
    num_pairs: int


@dataclass(frozen=True)
class RouterLoss:
    """The balancing loss of a model with ``num_experts`` experts, ``top_k`` per token, weighted ``coef``."""

    num_experts: int
    top_k: int
    coef: float
    scope: str = "global_batch"

    def statistics(self, router_logits: Sequence[Tensor], token_weights: Tensor) -> RoutingStatistics:
        """From each MoE layer's [tokens, experts] router logits and the [R, L] token weights."""
        weights = token_weights.reshape(-1).float()
        assigned = torch.zeros(self.num_experts, device=weights.device)
        probability = torch.zeros(self.num_experts, device=weights.device)
        for logits in router_logits:
            probs = logits.float().softmax(-1)
            chosen = probs.topk(self.top_k, dim=-1).indices
            assigned = assigned.index_add(0, chosen.reshape(-1), weights.repeat_interleave(self.top_k))
            probability = probability + (probs * weights[:, None]).sum(0)
        return RoutingStatistics(assigned, probability, weights.sum() * len(router_logits))

    def __call__(
        self,
        router_logits: Sequence[Tensor],
        token_weights: Tensor,
        num_pairs: int,
        whole: GlobalRouting | None,
    ) -> Tensor:
        """A micro-batch's balancing loss. Without ``whole``: over its own routings. With it (the global batch
        this micro-batch of ``num_pairs`` pairs belongs to): the global batch's loss as the value, and the
        gradient of this micro-batch's share of it, scaled by N / n so that the trainer's weighting of each
        micro-batch by its share of pairs, n / N, adds the shares up to the global loss's gradient."""
        own = self.statistics(router_logits, token_weights)
        if whole is None:
            return own.balancing_loss()
        total = whole.statistics
        share = (total.assigned / total.routings * own.probability / total.routings).sum() * self.num_experts
        share = share * (whole.num_pairs / max(num_pairs, 1))
        return total.balancing_loss().detach() + share - share.detach()


def router_loss(
    config: PretrainedConfig, coef: float | None, scope: str = "global_batch"
) -> RouterLoss | None:
    """The policy's balancing loss: ``coef`` (``model.router_aux_loss_coef``; None: the model config's
    ``router_aux_loss_coef``) over ``scope`` (``model.router_aux_loss_scope``), or None for a dense model or
    a coefficient of 0."""
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
    return RouterLoss(int(experts), int(config.num_experts_per_tok), float(coef), scope) if coef else None
