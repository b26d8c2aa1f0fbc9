"""The preference-loss family: pure functions on per-pair sequence log-probs.

Every input is a 1-D tensor of shape [B] (one entry per preference pair) and every loss returns the
per-pair losses, shape [B], in fp32; the caller reduces them. `preference_loss` upcasts its inputs to
fp32 on entry (the per-loss functions below expect fp32 tensors). Every loss uses log-sigmoids rather
than log(σ(·)), so it and its gradient stay finite for |βΔ| up to 1e4.

Notation, with πc = policy_chosen_logps, πr = policy_rejected_logps and refc, refr their reference
counterparts (summed or length-averaged over the response: the caller decides, see
`LENGTH_AVERAGED_LOSSES`):

    lc = πc − refc,  lr = πr − refr          per-response log-ratios ("chosen/rejected log-ratios")
    Δ  = lc − lr                              the policy's margin over the reference
    Δgt = gt_reward_scale · (rc − rr)         margin of the ground-truth rewards (RPO family)
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor

from preftune.config import DPOConfig

# --------------------------------------------------------------------------------------------------
# Losses on the policy margin Δ
# --------------------------------------------------------------------------------------------------


def dpo_loss(margin: Tensor, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """DPO: −log σ(βΔ) (Rafailov et al. 2023, arXiv:2305.18290).

    With label smoothing ε > 0 this is conservative DPO (cDPO; Mitchell 2023, "A note on DPO with noisy
    preferences & relationship to IPO"): −(1−ε)·log σ(βΔ) − ε·log σ(−βΔ).
    """
    logits = beta * margin
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def ipo_loss(margin: Tensor, beta: float) -> Tensor:
    """IPO: (Δ − 1/(2β))², β playing the paper's τ (Azar et al. 2023, arXiv:2310.12036, Eq. 17).

    The paper defines Δ on sequence log-probs log π(y|x), so "ipo" is not in `LENGTH_AVERAGED_LOSSES`.
    TRL divides Δ by the response lengths (token-averaged log-probs) for IPO; pass averaged log-probs
    to get that behaviour.
    """
    return (margin - 1 / (2 * beta)) ** 2


def hinge_loss(margin: Tensor, beta: float) -> Tensor:
    """SLiC hinge: relu(1 − βΔ) (Zhao et al. 2023, arXiv:2305.10425).

    SLiC-HF puts the margin on raw log-likelihoods; this is the reference-normalised form with margin
    1/β used by RSO (Liu et al. 2023, arXiv:2309.06657) and by TRL's "hinge".
    """
    return torch.relu(1 - beta * margin)


def robust_loss(margin: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """Robust DPO: ((1−ε)·(−log σ(βΔ)) + ε·log σ(−βΔ)) / (1 − 2ε).

    ε is the assumed probability that a preference label is flipped; needs 0 ≤ ε < 0.5 (Chowdhury et al.
    2024, "Provably Robust DPO", arXiv:2403.00409). Unlike cDPO the flipped-label term enters with a
    minus sign, which makes the loss an unbiased estimate of the clean-label loss (and unbounded below).
    """
    if problem := robust_epsilon_problem(label_smoothing):
        raise ValueError(f"{problem}, got {label_smoothing}")
    logits = beta * margin
    clean = -(1 - label_smoothing) * F.logsigmoid(logits)
    return (clean + label_smoothing * F.logsigmoid(-logits)) / (1 - 2 * label_smoothing)


def rdpo_loss(
    margin: Tensor, beta: float, alpha: float, chosen_lengths: Tensor, rejected_lengths: Tensor
) -> Tensor:
    """R-DPO: −log σ(βΔ − α·(|yc| − |yr|)), |y| the response token count.

    Length-regularised DPO (Park et al. 2024, "Disentangling Length from Quality in DPO",
    arXiv:2403.19159); α = 0 is plain DPO.
    """
    return -F.logsigmoid(beta * margin - alpha * (chosen_lengths - rejected_lengths))


def _bernoulli_kl(logit_p: Tensor, logit_q: Tensor) -> Tensor:
    """KL(Bern(σ(a)) ‖ Bern(σ(b))) = p·(log p − log q) + (1−p)·(log(1−p) − log(1−q)), via log-sigmoids."""
    log_p, log_not_p = F.logsigmoid(logit_p), F.logsigmoid(-logit_p)
    log_q, log_not_q = F.logsigmoid(logit_q), F.logsigmoid(-logit_q)
    return torch.sigmoid(logit_p) * (log_p - log_q) + torch.sigmoid(-logit_p) * (log_not_p - log_not_q)


EXO_DEFAULT_EPSILON = 1e-3
"""ε that `exo_pair_loss` uses when label_smoothing is 0 (the value the EXO paper and TRL use)."""


def exo_pair_loss(margin: Tensor, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """EXO (pairwise): KL(Bern(σ(βΔ)) ‖ Bern(1 − ε)).

    The reverse KL from the policy's preference probability to the smoothed label distribution
    [1 − ε, ε] (Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment",
    arXiv:2402.00856, Eq. 16 with K = 2). ε = label_smoothing, or `EXO_DEFAULT_EPSILON` when that is 0
    (ε = 0 would make the loss infinite). Minimised at βΔ = log((1 − ε)/ε), not monotone in Δ.
    """
    eps = label_smoothing or EXO_DEFAULT_EPSILON
    target_logit = torch.full_like(margin, math.log1p(-eps) - math.log(eps))
    return _bernoulli_kl(beta * margin, target_logit)


DISCOPOP_TAU = 0.05
"""Temperature τ of the DiscoPOP mixing sigmoid (the paper's value, TRL's `discopop_tau` default)."""


def discopop_loss(margin: Tensor, beta: float, tau: float = DISCOPOP_TAU) -> Tensor:
    """DiscoPOP / LRML: (1 − σ(βΔ/τ))·(−log σ(βΔ)) + σ(βΔ/τ)·exp(−βΔ).

    The log-ratio modulated loss discovered by Lu et al. 2024 ("Discovering Preference Optimization
    Algorithms with and for Large Language Models", arXiv:2406.08414, Eq. 5). The exponential term is
    evaluated as exp(log σ(βΔ/τ) − βΔ), whose exponent stays ≤ 0 for τ < 1, so it never overflows.
    """
    logits = beta * margin
    mix = torch.sigmoid(logits / tau)
    return -(1 - mix) * F.logsigmoid(logits) + torch.exp(F.logsigmoid(logits / tau) - logits)


# --------------------------------------------------------------------------------------------------
# Reward-aware preference optimisation (needs per-pair ground-truth rewards)
# --------------------------------------------------------------------------------------------------


def rpo_sq_loss(margin: Tensor, gt_margin: Tensor, beta: float) -> Tensor:
    """RPO, squared distance: (βΔ − Δgt)² (NeMo-Aligner's "rpo_sq"; Sun et al. 2025, "Reward-aware
    Preference Optimization", arXiv:2502.00203)."""
    return (beta * margin - gt_margin) ** 2


def rpo_bwd_kl_loss(margin: Tensor, gt_margin: Tensor, beta: float) -> Tensor:
    """RPO, backward KL: KL(Bern(σ(Δgt)) ‖ Bern(σ(βΔ))).

    The RPO loss of the Nemotron-4 340B report (Nvidia 2024, arXiv:2406.11704), named
    "rpo_bwd_kl" in NeMo-Aligner.
    """
    return _bernoulli_kl(gt_margin, beta * margin)


def rpo_fwd_kl_loss(margin: Tensor, gt_margin: Tensor, beta: float) -> Tensor:
    """RPO, forward KL: KL(Bern(σ(βΔ)) ‖ Bern(σ(Δgt))) (NeMo-Aligner's "rpo_fwd_kl"; Sun et al. 2025,
    arXiv:2502.00203)."""
    return _bernoulli_kl(beta * margin, gt_margin)


# --------------------------------------------------------------------------------------------------
# Losses on the chosen and rejected log-ratios separately
# --------------------------------------------------------------------------------------------------


def bco_pair_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float, delta: Tensor) -> Tensor:
    """BCO (pairwise): −log σ(β·lc − δ) − log σ(−(β·lr − δ)).

    Binary classification of chosen vs rejected implicit rewards around a reward shift δ (Jung et al.
    2024, "Binary Classifier Optimization for Large Language Model Alignment", arXiv:2404.04656). δ is
    the running mean of the implicit rewards β·lc and β·lr over training; the trainer keeps it (see
    `RunningMean`) and passes it in, and it is treated as a constant here.
    """
    return -F.logsigmoid(beta * chosen_logratios - delta) - F.logsigmoid(-(beta * rejected_logratios - delta))


def nca_pair_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float) -> Tensor:
    """NCA (pairwise): −log σ(β·lc) − ½·log σ(−β·lc) − ½·log σ(−β·lr).

    Noise-contrastive alignment (Chen et al. 2024, "Noise Contrastive Alignment of Language Models with
    Explicit Rewards", arXiv:2402.05369), pairwise-preference form. Minimised at σ(β·lc) = 2/3, so it is
    not monotone in the chosen log-ratio.
    """
    chosen, rejected = beta * chosen_logratios, beta * rejected_logratios
    return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)


def sppo_hard_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float) -> Tensor:
    """SPPO with hard labels: (lc − 1/(2β))² + (lr + 1/(2β))².

    Self-Play Preference Optimization (Wu et al. 2024, arXiv:2405.00675, Algorithm 1) with the win
    probability set to 1 for the chosen and 0 for the rejected response, and η = 1/β (as TRL).
    """
    half_eta = 1 / (2 * beta)
    return (chosen_logratios - half_eta) ** 2 + (rejected_logratios + half_eta) ** 2


def apo_zero_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float) -> Tensor:
    """APO-zero: −σ(β·lc) + σ(β·lr): push chosen up and rejected down.

    Anchored Preference Optimization (D'Oosterlinck et al. 2024, arXiv:2408.06266, Eq. 7). TRL adds
    1 so the loss is ≥ 0; this follows the paper (same gradients, values 1 lower).
    """
    return -torch.sigmoid(beta * chosen_logratios) + torch.sigmoid(beta * rejected_logratios)


def apo_down_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float) -> Tensor:
    """APO-down: σ(β·lc) − σ(β·(lc − lr)): push both down, rejected more.

    D'Oosterlinck et al. 2024, arXiv:2408.06266, Eq. 8. TRL adds 1 so the loss is ≥ 0; this follows
    the paper (same gradients, values 1 lower).
    """
    return torch.sigmoid(beta * chosen_logratios) - torch.sigmoid(
        beta * (chosen_logratios - rejected_logratios)
    )


def aot_loss(
    policy_margins: Tensor, ref_margins: Tensor, beta: float, label_smoothing: float = 0.0
) -> Tensor:
    """AOT, paired: (c)DPO on sort(πc − πr) − sort(refc − refr), sorted over the batch.

    Alignment via Optimal Transport (Melnyk et al. 2024, "Distributional Preference Alignment of LLMs
    via Optimal Transport", arXiv:2406.05882): asks the batch distribution of policy log-ratios to
    dominate the reference's in first order, quantile by quantile. A batch-level loss: entry i belongs
    to the i-th quantile, not to pair i, so only the reduction over the batch is meaningful.
    """
    margins = torch.sort(policy_margins).values - torch.sort(ref_margins).values
    return dpo_loss(margins, beta, label_smoothing)


def aot_pair_loss(
    chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float, label_smoothing: float = 0.0
) -> Tensor:
    """AOT, unpaired: (c)DPO on sort(lc) − sort(lr), sorted over the batch.

    Melnyk et al. 2024, arXiv:2406.05882, unpaired variant: the chosen log-ratio distribution should
    dominate the rejected one. TRL's name "aot_pair" (later "aot_unpaired") is kept. Batch-level like
    `aot_loss`: entry i is the i-th quantile, not pair i.
    """
    margins = torch.sort(chosen_logratios).values - torch.sort(rejected_logratios).values
    return dpo_loss(margins, beta, label_smoothing)


# --------------------------------------------------------------------------------------------------
# Reference-free losses (inputs are length-averaged log-probs)
# --------------------------------------------------------------------------------------------------


def simpo_loss(
    policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, beta: float, gamma: float
) -> Tensor:
    """SimPO: −log σ(β·(πc − πr) − γ), π the length-averaged log-probs, γ the target reward margin.

    Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward",
    arXiv:2405.14734.
    """
    return -F.logsigmoid(beta * (policy_chosen_logps - policy_rejected_logps) - gamma)


def _log_odds(avg_logps: Tensor) -> Tensor:
    """log(p / (1 − p)) for p = exp(avg_logps), i.e. avg_logps − log(−expm1(avg_logps)).

    Log-probs closer to 0 than fp32's machine epsilon are rounding noise; they are clamped there so the
    odds stay finite (≤ ~16) when a response has probability 1 in fp32.
    """
    avg_logps = avg_logps.clamp(max=-torch.finfo(torch.float32).eps)
    return avg_logps - torch.log(-torch.expm1(avg_logps))


def orpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, beta: float) -> Tensor:
    """ORPO odds-ratio term: −β·log σ(log-odds(πc) − log-odds(πr)), π the length-averaged log-probs.

    Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model",
    arXiv:2403.07691, with β as the paper's λ (as TRL). The full ORPO objective is
    L_SFT + λ·L_OR: this function is only the λ·L_OR part; the trainer adds the NLL part
    (`sft_loss` on the length-averaged chosen log-probs, weight 1 in the paper).
    """
    return -beta * F.logsigmoid(_log_odds(policy_chosen_logps) - _log_odds(policy_rejected_logps))


# --------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pairs:
    """One validated, fp32 batch of preference pairs plus hyperparameters, as read by the dispatch table."""

    policy_chosen: Tensor
    policy_rejected: Tensor
    ref_chosen: Tensor | None
    ref_rejected: Tensor | None
    beta: float
    gt_margin: Tensor | None
    chosen_lengths: Tensor | None
    rejected_lengths: Tensor | None
    label_smoothing: float
    simpo_gamma: float
    rdpo_alpha: float
    bco_delta: Tensor

    @property
    def chosen_logratios(self) -> Tensor:
        return self.policy_chosen - self.ref_chosen

    @property
    def rejected_logratios(self) -> Tensor:
        return self.policy_rejected - self.ref_rejected

    @property
    def margin(self) -> Tensor:
        return self.chosen_logratios - self.rejected_logratios


_LOSSES: dict[str, Callable[[_Pairs], Tensor]] = {
    "dpo": lambda p: dpo_loss(p.margin, p.beta, p.label_smoothing),
    "ipo": lambda p: ipo_loss(p.margin, p.beta),
    "rpo_sq": lambda p: rpo_sq_loss(p.margin, p.gt_margin, p.beta),
    "rpo_bwd_kl": lambda p: rpo_bwd_kl_loss(p.margin, p.gt_margin, p.beta),
    "rpo_fwd_kl": lambda p: rpo_fwd_kl_loss(p.margin, p.gt_margin, p.beta),
    "hinge": lambda p: hinge_loss(p.margin, p.beta),
    "robust": lambda p: robust_loss(p.margin, p.beta, p.label_smoothing),
    "bco_pair": lambda p: bco_pair_loss(p.chosen_logratios, p.rejected_logratios, p.beta, p.bco_delta),
    "exo_pair": lambda p: exo_pair_loss(p.margin, p.beta, p.label_smoothing),
    "nca_pair": lambda p: nca_pair_loss(p.chosen_logratios, p.rejected_logratios, p.beta),
    "sppo_hard": lambda p: sppo_hard_loss(p.chosen_logratios, p.rejected_logratios, p.beta),
    "aot": lambda p: aot_loss(
        p.policy_chosen - p.policy_rejected, p.ref_chosen - p.ref_rejected, p.beta, p.label_smoothing
    ),
    "aot_pair": lambda p: aot_pair_loss(p.chosen_logratios, p.rejected_logratios, p.beta, p.label_smoothing),
    "apo_zero": lambda p: apo_zero_loss(p.chosen_logratios, p.rejected_logratios, p.beta),
    "apo_down": lambda p: apo_down_loss(p.chosen_logratios, p.rejected_logratios, p.beta),
    "discopop": lambda p: discopop_loss(p.margin, p.beta),
    "rdpo": lambda p: rdpo_loss(p.margin, p.beta, p.rdpo_alpha, p.chosen_lengths, p.rejected_lengths),
    "simpo": lambda p: simpo_loss(p.policy_chosen, p.policy_rejected, p.beta, p.simpo_gamma),
    "orpo": lambda p: orpo_loss(p.policy_chosen, p.policy_rejected, p.beta),
}

LOSS_NAMES: tuple[str, ...] = tuple(_LOSSES)
"""Every name `preference_loss` accepts."""

REFERENCE_FREE_LOSSES: frozenset[str] = frozenset({"simpo", "orpo"})
"""Losses without a reference model: their ref_* arguments must be None and no reference model is built."""

LENGTH_AVERAGED_LOSSES: frozenset[str] = frozenset({"simpo", "orpo"})
"""Losses whose paper defines them on length-averaged log-probs; the rest use summed log-probs.

IPO is not here: Azar et al. write its loss on sequence log-probs log π(y|x) (TRL averages instead).
"""

NEEDS_REWARDS: frozenset[str] = frozenset({"rpo_sq", "rpo_bwd_kl", "rpo_fwd_kl"})
"""Losses that need per-pair ground-truth rewards (chosen_rewards, rejected_rewards)."""

NEEDS_LENGTHS: frozenset[str] = frozenset({"rdpo"})
"""Losses that need the response token counts (chosen_lengths, rejected_lengths)."""


def unknown_loss(name: str) -> str:
    """What is wrong with loss name ``name`` (not in ``LOSS_NAMES``): the nearest name, or where an SFT term
    goes, and the valid names."""
    nearest = difflib.get_close_matches(name, LOSS_NAMES, n=1)
    hint = f" Did you mean '{nearest[0]}'?" if nearest else ""
    if name == "sft":
        hint = " The SFT term is not a preference loss: set dpo.sft_loss_weight (e.g. 1.0) instead."
    return f"unknown loss '{name}'.{hint} Valid: {', '.join(LOSS_NAMES)}"


def robust_epsilon_problem(label_smoothing: float) -> str | None:
    """The robust loss divides by 1 - 2ε: what is wrong with ε = ``label_smoothing``, or None."""
    if 0.0 <= label_smoothing < 0.5:
        return None
    return "the robust loss needs 0 <= label_smoothing < 0.5 (it divides by 1 - 2ε)"


def _check_inputs(name: str, beta: float, policy_chosen_logps: Tensor, **others: Tensor | None) -> None:
    """Raise ValueError for an unknown name, inputs `name` needs but lacks, refs it must not get, bad shapes,
    a beta <= 0."""
    if name not in _LOSSES:
        raise ValueError(unknown_loss(name))
    missing = [key for key, tensor in others.items() if tensor is None]
    refs = ["ref_chosen_logps", "ref_rejected_logps"]
    if name in REFERENCE_FREE_LOSSES:
        if given := [key for key in refs if key not in missing]:
            raise ValueError(f"loss {name!r} is reference-free: {' and '.join(given)} must be None")
    elif lacking := [key for key in refs if key in missing]:
        raise ValueError(
            f"loss {name!r} needs the reference model's log-probs; missing: {', '.join(lacking)}"
        )
    for needs, keys, what in (
        (NEEDS_REWARDS, ["chosen_rewards", "rejected_rewards"], "per-pair ground-truth rewards"),
        (NEEDS_LENGTHS, ["chosen_lengths", "rejected_lengths"], "response token counts"),
    ):
        if name in needs and (lacking := [key for key in keys if key in missing]):
            raise ValueError(f"loss {name!r} needs {what}; missing: {', '.join(lacking)}")
    if policy_chosen_logps.dim() != 1:
        raise ValueError(
            f"expected 1-D [B] tensors, policy_chosen_logps has shape {tuple(policy_chosen_logps.shape)}"
        )
    for key, tensor in others.items():
        if tensor is not None and tensor.shape != policy_chosen_logps.shape:
            raise ValueError(
                f"{key} has shape {tuple(tensor.shape)}, expected {tuple(policy_chosen_logps.shape)}"
            )
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")


def _fp32(tensor: Tensor | None) -> Tensor | None:
    return None if tensor is None else tensor.float()


def _gt_margin(chosen_rewards: Tensor | None, rejected_rewards: Tensor | None, scale: float) -> Tensor | None:
    """Δgt = η·(rc − rr) in fp32 (None without rewards)."""
    if chosen_rewards is None or rejected_rewards is None:
        return None
    return scale * (chosen_rewards.float() - rejected_rewards.float())


def _bco_delta(bco_delta: Tensor | float | None, device: torch.device) -> Tensor:
    """BCO's δ as a constant fp32 tensor on ``device`` (None: 0)."""
    delta = torch.as_tensor(0.0 if bco_delta is None else bco_delta, dtype=torch.float32)
    return delta.detach().to(device)


def preference_loss(
    name: str,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float,
    chosen_rewards: Tensor | None = None,
    rejected_rewards: Tensor | None = None,
    gt_reward_scale: float = 1.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    rdpo_alpha: float = 0.0,
    bco_delta: Tensor | float | None = None,
) -> Tensor:
    """Per-pair preference loss `name` (one of `LOSS_NAMES`), shape [B], fp32.

    Args:
        policy_chosen_logps, policy_rejected_logps: [B] policy log-probs of the responses, summed or
            length-averaged (see `LENGTH_AVERAGED_LOSSES`).
        ref_chosen_logps, ref_rejected_logps: [B] the same for the reference model; None, and only None,
            for `REFERENCE_FREE_LOSSES`.
        beta: β, the inverse temperature (IPO's τ, ORPO's λ, SimPO's reward scale).
        chosen_rewards, rejected_rewards: [B] ground-truth rewards, for `NEEDS_REWARDS`; gt_reward_scale: η
            in Δgt = η·(rc − rr).
        chosen_lengths, rejected_lengths: [B] response token counts, for `NEEDS_LENGTHS` (R-DPO).
        label_smoothing: ε of cDPO ("dpo", "aot", "aot_pair"), of "robust" and of "exo_pair".
        simpo_gamma, rdpo_alpha: SimPO's target margin γ (0.5 as TRL; tuned with β), R-DPO's length penalty α.
        bco_delta: BCO's reward shift δ (the trainer's running mean of implicit rewards); None means 0.
    """
    _check_inputs(
        name,
        beta,
        policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
    )
    pairs = _Pairs(
        policy_chosen=policy_chosen_logps.float(),
        policy_rejected=policy_rejected_logps.float(),
        ref_chosen=_fp32(ref_chosen_logps),
        ref_rejected=_fp32(ref_rejected_logps),
        beta=beta,
        gt_margin=_gt_margin(chosen_rewards, rejected_rewards, gt_reward_scale),
        chosen_lengths=_fp32(chosen_lengths),
        rejected_lengths=_fp32(rejected_lengths),
        label_smoothing=label_smoothing,
        simpo_gamma=simpo_gamma,
        rdpo_alpha=rdpo_alpha,
        bco_delta=_bco_delta(bco_delta, policy_chosen_logps.device),
    )
    return _LOSSES[name](pairs)


def mixture_loss(
    names: list[str],
    weights: list[float],
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    **kwargs: Any,
) -> Tensor:
    """Σ_i w_i · loss_i per pair, shape [B], fp32 (TRL's MPO-style mixtures, e.g. dpo + bco_pair).

    `kwargs` are `preference_loss`'s keyword arguments (beta, ...), shared by every part. Reference-based
    and reference-free losses cannot be mixed. An SFT term is not a name here: add `sft_loss` yourself.
    """
    if not names or len(names) != len(weights):
        raise ValueError(f"need one weight per loss name, got names={names} and weights={weights}")
    logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    parts = [
        weight * preference_loss(name, *logps, **kwargs) for name, weight in zip(names, weights, strict=True)
    ]
    return torch.stack(parts).sum(0)


def sft_loss(policy_chosen_logps: Tensor) -> Tensor:
    """Per-pair NLL of the chosen response, −πc, fp32.

    On length-averaged log-probs this is the token-mean cross-entropy, ORPO's L_SFT; the trainer weights
    and adds it.
    """
    return -policy_chosen_logps.float()


def implicit_rewards(policy_logps: Tensor, ref_logps: Tensor | None, beta: float) -> Tensor:
    """DPO's implicit reward β·(π − ref), or β·π for reference-free losses; fp32, not detached."""
    rewards = policy_logps.float() if ref_logps is None else policy_logps.float() - ref_logps.float()
    return beta * rewards


class RunningMean:
    """Mean of every value seen so far: BCO's reward shift δ.

    After each optimizer step the trainer folds in the mean implicit reward of both responses of all the
    step's pairs (every micro-batch and rank), so the loss of step t uses δ over steps 1..t-1 (0 at the first
    step): the same δ whatever the micro-batch size or number of ranks. Keep it in the checkpoint via
    `state_dict`.
    """

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0

    def update(self, mean: float, count: int) -> float:
        """Fold in `count` values whose mean is `mean`; return the new mean."""
        self.total += float(mean) * count
        self.count += count
        return self.value

    @property
    def value(self) -> float:
        """The mean so far; 0 before the first update."""
        return self.total / self.count if self.count else 0.0

    def state_dict(self) -> dict[str, float | int]:
        return {"total": self.total, "count": self.count}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.total, self.count = float(state["total"]), int(state["count"])


def loss_names(preference_loss: str | Sequence[str]) -> tuple[str, ...]:
    """``dpo.preference_loss`` as names: one name, or the names of a mixture."""
    if isinstance(preference_loss, str):
        return (preference_loss,)
    return tuple(str(name) for name in preference_loss)


@dataclass(frozen=True)
class LossSettings:
    """The ``dpo.*`` config, parsed once: what ``DPOModel`` computes its objective from."""

    names: tuple[str, ...]
    """The preference loss, or the parts of a mixture."""
    weights: tuple[float, ...]
    """One weight per name."""
    beta: float
    """β (``dpo.ref_policy_kl_penalty``)."""
    average_logps: bool
    """Length-average the response log-probs in the preference loss (else sum)."""
    sft_average_logps: bool
    """Length-average the chosen log-probs in the SFT loss (else sum)."""
    preference_weight: float
    sft_weight: float
    gt_reward_scale: float
    label_smoothing: float
    simpo_gamma: float
    rdpo_alpha: float

    @classmethod
    def from_config(cls, dpo: DPOConfig | Mapping[str, Any]) -> LossSettings:
        """From the ``dpo`` section (names and weights are checked by ``preftune.config_checks``); a plain
        mapping is read over ``DPOConfig``'s defaults."""
        dpo = OmegaConf.merge(OmegaConf.structured(DPOConfig), dpo)
        names = loss_names(dpo.preference_loss)
        average = dpo.preference_average_log_probs
        return cls(
            names=names,
            weights=tuple(dpo.preference_loss_weights or [1.0] * len(names)),
            beta=float(dpo.ref_policy_kl_penalty),
            average_logps=(
                any(n in LENGTH_AVERAGED_LOSSES for n in names) if average is None else bool(average)
            ),
            sft_average_logps=bool(dpo.sft_average_log_probs),
            preference_weight=float(dpo.preference_loss_weight),
            sft_weight=float(dpo.sft_loss_weight),
            gt_reward_scale=float(dpo.gt_reward_scale),
            label_smoothing=float(dpo.label_smoothing),
            simpo_gamma=float(dpo.simpo_gamma),
            rdpo_alpha=float(dpo.rdpo_alpha),
        )

    @property
    def reference_free(self) -> bool:
        """No reference log-probs are needed (simpo, orpo)."""
        return all(n in REFERENCE_FREE_LOSSES for n in self.names)

    @property
    def uses_bco_delta(self) -> bool:
        return "bco_pair" in self.names
