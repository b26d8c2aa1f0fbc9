"""Tests for preftune.losses: values against slow float64 formulas, stability, gradients, errors."""

import math

import pytest
import torch

from preftune.losses import (
    LENGTH_AVERAGED_LOSSES,
    LOSS_NAMES,
    NEEDS_LENGTHS,
    NEEDS_REWARDS,
    REFERENCE_FREE_LOSSES,
    RunningMean,
    implicit_rewards,
    mixture_loss,
    preference_loss,
    sft_loss,
)

BETA, ETA, GAMMA, ALPHA, DELTA = 0.5, 0.5, 0.75, 0.25, 0.25

# Fixed pairs, all exactly representable in fp32: policy / reference log-probs, rewards, lengths.
PC = [-1.25, -2.5, -0.625, -3.0]
PR = [-2.0, -1.5, -0.5, -3.25]
RC = [-1.5, -2.0, -1.0, -2.75]
RR = [-1.75, -2.25, -0.25, -3.5]
GC = [1.0, 0.5, 2.0, -0.5]
GR = [0.0, 1.0, 1.5, -1.0]
LC = [3, 5, 2, 7]
LR = [4, 2, 6, 7]

MONOTONE = ["dpo", "hinge", "robust", "bco_pair", "aot", "aot_pair", "apo_zero", "rdpo", "simpo", "orpo"]


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def kl_bernoulli(p: float, q: float) -> float:
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


def log_odds(avg_logp: float) -> float:
    p = math.exp(avg_logp)
    return math.log(p / (1 - p))


def slow_losses(name: str, eps: float) -> list[float]:
    """Each loss from its paper's formula, in plain float64 Python."""
    n = len(PC)
    lc = [PC[i] - RC[i] for i in range(n)]
    lr = [PR[i] - RR[i] for i in range(n)]
    d = [lc[i] - lr[i] for i in range(n)]
    gt = [ETA * (GC[i] - GR[i]) for i in range(n)]

    def cdpo(x: float) -> float:
        return -(1 - eps) * math.log(sig(BETA * x)) - eps * math.log(1 - sig(BETA * x))

    if name == "aot":
        policy, ref = sorted(PC[i] - PR[i] for i in range(n)), sorted(RC[i] - RR[i] for i in range(n))
        return [cdpo(a - b) for a, b in zip(policy, ref, strict=True)]
    if name == "aot_pair":
        return [cdpo(a - b) for a, b in zip(sorted(lc), sorted(lr), strict=True)]
    tau = 0.05
    per_pair = {
        "dpo": lambda i: cdpo(d[i]),
        "ipo": lambda i: (d[i] - 1 / (2 * BETA)) ** 2,
        "rpo_sq": lambda i: (BETA * d[i] - gt[i]) ** 2,
        "rpo_bwd_kl": lambda i: kl_bernoulli(sig(gt[i]), sig(BETA * d[i])),
        "rpo_fwd_kl": lambda i: kl_bernoulli(sig(BETA * d[i]), sig(gt[i])),
        "hinge": lambda i: max(0.0, 1 - BETA * d[i]),
        "robust": lambda i: (
            ((1 - eps) * -math.log(sig(BETA * d[i])) + eps * math.log(1 - sig(BETA * d[i]))) / (1 - 2 * eps)
        ),
        "bco_pair": lambda i: -math.log(sig(BETA * lc[i] - DELTA)) - math.log(1 - sig(BETA * lr[i] - DELTA)),
        "exo_pair": lambda i: kl_bernoulli(sig(BETA * d[i]), 1 - (eps or 1e-3)),
        "nca_pair": lambda i: (
            -math.log(sig(BETA * lc[i]))
            - 0.5 * math.log(1 - sig(BETA * lc[i]))
            - 0.5 * math.log(1 - sig(BETA * lr[i]))
        ),
        "sppo_hard": lambda i: (lc[i] - 1 / (2 * BETA)) ** 2 + (lr[i] + 1 / (2 * BETA)) ** 2,
        "apo_zero": lambda i: -sig(BETA * lc[i]) + sig(BETA * lr[i]),
        "apo_down": lambda i: sig(BETA * lc[i]) - sig(BETA * d[i]),
        "discopop": lambda i: (
            (1 - sig(BETA * d[i] / tau)) * -math.log(sig(BETA * d[i]))
            + sig(BETA * d[i] / tau) * math.exp(-BETA * d[i])
        ),
        "rdpo": lambda i: -math.log(sig(BETA * d[i] - ALPHA * (LC[i] - LR[i]))),
        "simpo": lambda i: -math.log(sig(BETA * (PC[i] - PR[i]) - GAMMA)),
        "orpo": lambda i: -BETA * math.log(sig(log_odds(PC[i]) - log_odds(PR[i]))),
    }
    return [per_pair[name](i) for i in range(n)]


def call(name: str, pc, pr, rc, rr, batch: int | None = None, **overrides) -> torch.Tensor:
    """preference_loss with every optional input given (refs dropped for reference-free losses)."""
    b = batch or len(PC)
    kwargs = {
        "beta": BETA,
        "chosen_rewards": torch.tensor(GC[:b]),
        "rejected_rewards": torch.tensor(GR[:b]),
        "gt_reward_scale": ETA,
        "chosen_lengths": torch.tensor(LC[:b]),
        "rejected_lengths": torch.tensor(LR[:b]),
        "label_smoothing": 0.0,
        "simpo_gamma": GAMMA,
        "rdpo_alpha": ALPHA,
        "bco_delta": DELTA,
    } | overrides
    if name in REFERENCE_FREE_LOSSES:
        rc = rr = None
    return preference_loss(name, pc, pr, rc, rr, **kwargs)


def fixed() -> tuple[torch.Tensor, ...]:
    return tuple(torch.tensor(v) for v in (PC, PR, RC, RR))


def test_name_sets_are_consistent() -> None:
    assert len(set(LOSS_NAMES)) == len(LOSS_NAMES) == 19
    for group in (REFERENCE_FREE_LOSSES, LENGTH_AVERAGED_LOSSES, NEEDS_REWARDS, NEEDS_LENGTHS):
        assert group <= set(LOSS_NAMES)
    assert {"simpo", "orpo"} <= LENGTH_AVERAGED_LOSSES
    assert "ipo" not in LENGTH_AVERAGED_LOSSES
    assert {"simpo", "orpo"} == REFERENCE_FREE_LOSSES
    assert {"rpo_sq", "rpo_bwd_kl", "rpo_fwd_kl"} == NEEDS_REWARDS


@pytest.mark.parametrize("eps", [0.0, 0.125])
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_matches_slow_formula(name: str, eps: float) -> None:
    out = call(name, *fixed(), label_smoothing=eps)
    assert out.dtype == torch.float32 and out.shape == (len(PC),)
    expected = torch.tensor(slow_losses(name, eps), dtype=torch.float64)
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)


def test_hand_computed_values() -> None:
    one, zero = torch.tensor([1.0]), torch.tensor([0.0])
    # −log σ(1) = log(1 + e^−1)
    assert preference_loss("dpo", one, zero, zero, zero, beta=1.0).item() == pytest.approx(
        0.3132616875, abs=1e-6
    )
    # (0 − 1/(2·0.5))² = 1;  relu(1 − 0.5·1) = 0.5
    assert preference_loss("ipo", zero, zero, zero, zero, beta=0.5).item() == pytest.approx(1.0, abs=1e-6)
    assert preference_loss("hinge", one, zero, zero, zero, beta=0.5).item() == pytest.approx(0.5, abs=1e-6)


def extreme_inputs(name: str, sign: float, beta: float) -> tuple[torch.Tensor | None, ...]:
    """Pairs with β·Δ = sign·1e4: both sides extreme in pair 0, only the rejected side in pair 1."""
    d = 1e4 / beta
    if name in REFERENCE_FREE_LOSSES:  # length-averaged log-probs must stay ≤ 0
        chosen, rejected = (-1.0, -1.0 - d) if sign > 0 else (-1.0 - d, -1.0)
        return torch.tensor([chosen, chosen]), torch.tensor([rejected, rejected]), None, None
    pc = torch.tensor([-1.0 + sign * d / 2, -1.0])
    pr = torch.tensor([-1.0 - sign * d / 2, -1.0 - sign * d])
    ref = torch.tensor([-1.0, -1.0])
    return pc, pr, ref, ref.clone()


@pytest.mark.parametrize("eps", [0.0, 0.125])
@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_finite_loss_and_gradient_at_extreme_margins(name: str, sign: float, eps: float) -> None:
    beta = 0.1
    pc, pr, rc, rr = extreme_inputs(name, sign, beta)
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    out = call(name, pc, pr, rc, rr, batch=2, beta=beta, label_smoothing=eps)
    assert torch.isfinite(out).all(), out
    out.sum().backward()
    assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()


def test_orpo_finite_when_log_probs_reach_zero() -> None:
    pc = torch.tensor([0.0, -1e-30, -1e-3], requires_grad=True)
    pr = torch.tensor([-1.0, 0.0, -0.0], requires_grad=True)
    out = preference_loss("orpo", pc, pr, None, None, beta=0.1)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_dpo_is_log_2_when_policy_equals_reference(eps: float) -> None:
    gen = torch.Generator().manual_seed(1)
    logps_c, logps_r = -10 * torch.rand(6, generator=gen), -10 * torch.rand(6, generator=gen)
    out = preference_loss(
        "dpo", logps_c, logps_r, logps_c.clone(), logps_r.clone(), beta=0.1, label_smoothing=eps
    )
    torch.testing.assert_close(out, torch.full((6,), math.log(2)), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("name", "eps"), [(name, 0.0) for name in MONOTONE] + [("dpo", 0.1), ("robust", 0.1)]
)
def test_raising_the_margin_never_raises_the_loss(name: str, eps: float) -> None:
    gen = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-3 * torch.rand(16, generator=gen) for _ in range(4))
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    extras = {
        "chosen_lengths": torch.randint(1, 20, (16,), generator=gen),
        "rejected_lengths": torch.randint(1, 20, (16,), generator=gen),
    }
    out = call(
        name, pc, pr, rc, rr, label_smoothing=eps, chosen_rewards=None, rejected_rewards=None, **extras
    )
    out.sum().backward()
    assert (pc.grad <= 0).all(), pc.grad
    assert (pr.grad >= 0).all(), pr.grad
    assert (pc.grad < 0).any()


def optimise_margin(name: str, beta: float, steps: int, lr: float) -> float:
    """Gradient descent on one pair's policy margin (reference fixed at 0); returns the margin."""
    margin = torch.zeros(1, requires_grad=True)
    zero = torch.zeros(1)
    optimiser = torch.optim.SGD([margin], lr=lr)
    for _ in range(steps):
        optimiser.zero_grad()
        preference_loss(name, margin, zero, zero, zero, beta=beta).sum().backward()
        optimiser.step()
    return margin.item()


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_ipo_margin_converges_to_its_target(beta: float) -> None:
    target = 1 / (2 * beta)
    assert optimise_margin("ipo", beta, steps=100, lr=0.2) == pytest.approx(target, rel=0.01)


def test_dpo_margin_keeps_growing() -> None:
    after_n, after_2n = optimise_margin("dpo", 0.1, 300, 1.0), optimise_margin("dpo", 0.1, 600, 1.0)
    assert after_2n > after_n > 1 / (2 * 0.1)


def test_unknown_name_names_the_nearest() -> None:
    pc, pr, rc, rr = fixed()
    with pytest.raises(ValueError, match="Did you mean 'simpo'") as info:
        preference_loss("simp0", pc, pr, None, None, beta=BETA)
    assert "rpo_bwd_kl" in str(info.value)  # lists the valid names
    with pytest.raises(ValueError, match="Did you mean 'bco_pair'"):
        preference_loss("bco-pair", pc, pr, rc, rr, beta=BETA)


@pytest.mark.parametrize("name", sorted(NEEDS_REWARDS))
def test_rpo_without_rewards_fails(name: str) -> None:
    pc, pr, rc, rr = fixed()
    with pytest.raises(ValueError, match="rejected_rewards"):
        preference_loss(name, pc, pr, rc, rr, beta=BETA, chosen_rewards=torch.tensor(GC))
    with pytest.raises(ValueError, match="chosen_rewards, rejected_rewards"):
        preference_loss(name, pc, pr, rc, rr, beta=BETA)


def test_reference_arguments_are_checked() -> None:
    pc, pr, rc, rr = fixed()
    with pytest.raises(ValueError, match="missing: ref_rejected_logps"):
        preference_loss("dpo", pc, pr, rc, None, beta=BETA)
    with pytest.raises(ValueError, match="missing: ref_chosen_logps, ref_rejected_logps"):
        preference_loss("ipo", pc, pr, None, None, beta=BETA)
    with pytest.raises(ValueError, match="reference-free"):
        preference_loss("simpo", pc, pr, rc, rr, beta=BETA)
    with pytest.raises(ValueError, match="reference-free"):
        preference_loss("orpo", pc, pr, None, rr, beta=BETA)


def test_other_invalid_inputs() -> None:
    pc, pr, rc, rr = fixed()
    for eps in (0.5, 0.7, -0.1):
        with pytest.raises(ValueError, match="label_smoothing"):
            preference_loss("robust", pc, pr, rc, rr, beta=BETA, label_smoothing=eps)
    with pytest.raises(ValueError, match="chosen_lengths"):
        preference_loss("rdpo", pc, pr, rc, rr, beta=BETA, rdpo_alpha=0.1)
    with pytest.raises(ValueError, match="beta"):
        preference_loss("dpo", pc, pr, rc, rr, beta=0.0)
    with pytest.raises(ValueError, match="shape"):
        preference_loss("dpo", pc, pr[:2], rc, rr, beta=BETA)
    with pytest.raises(ValueError, match="1-D"):
        preference_loss("dpo", pc[None], pr[None], rc[None], rr[None], beta=BETA)


def test_mixture_is_the_weighted_sum() -> None:
    pc, pr, rc, rr = fixed()
    kwargs = {"beta": BETA, "chosen_rewards": torch.tensor(GC), "rejected_rewards": torch.tensor(GR)}
    names, weights = ["dpo", "bco_pair", "nca_pair", "rpo_fwd_kl"], [0.8, 0.2, 0.5, 1.5]
    expected = sum(
        w * preference_loss(n, pc, pr, rc, rr, **kwargs) for n, w in zip(names, weights, strict=True)
    )
    torch.testing.assert_close(mixture_loss(names, weights, pc, pr, rc, rr, **kwargs), expected)
    free = mixture_loss(["simpo", "orpo"], [1.0, 0.5], pc, pr, None, None, beta=2.0)
    manual = preference_loss("simpo", pc, pr, None, None, beta=2.0) + 0.5 * preference_loss(
        "orpo", pc, pr, None, None, beta=2.0
    )
    torch.testing.assert_close(free, manual)
    with pytest.raises(ValueError, match="one weight per loss"):
        mixture_loss(["dpo", "ipo"], [1.0], pc, pr, rc, rr, beta=BETA)
    with pytest.raises(ValueError, match="reference-free"):
        mixture_loss(["dpo", "simpo"], [1.0, 1.0], pc, pr, rc, rr, beta=BETA)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_bf16_inputs_give_fp32_losses(name: str) -> None:
    bf16 = [t.to(torch.bfloat16) for t in fixed()]
    out = call(name, *bf16, label_smoothing=0.125)
    assert out.dtype == torch.float32
    assert torch.equal(out, call(name, *(t.float() for t in bf16), label_smoothing=0.125))


def test_bco_delta_is_a_constant_shift() -> None:
    pc, pr, rc, rr = fixed()
    as_float = preference_loss("bco_pair", pc, pr, rc, rr, beta=BETA, bco_delta=DELTA)
    delta = torch.tensor(DELTA, requires_grad=True)
    as_tensor = preference_loss("bco_pair", pc, pr, rc, rr, beta=BETA, bco_delta=delta)
    torch.testing.assert_close(as_tensor, as_float)
    assert not as_tensor.requires_grad  # δ is detached
    torch.testing.assert_close(
        preference_loss("bco_pair", pc, pr, rc, rr, beta=BETA),
        preference_loss("bco_pair", pc, pr, rc, rr, beta=BETA, bco_delta=0.0),
    )


def test_running_mean() -> None:
    mean = RunningMean()
    assert mean.value == 0.0
    assert mean.update(2.0, 3) == pytest.approx(2.0)  # values 1, 2, 3
    assert mean.update(6.0, 1) == pytest.approx(3.0)
    restored = RunningMean()
    restored.load_state_dict(mean.state_dict())
    assert restored.value == mean.value
    assert restored.update(-3.0, 1) == pytest.approx(9 / 5)


def test_sft_loss_and_implicit_rewards() -> None:
    pc, _, rc, _ = fixed()
    torch.testing.assert_close(sft_loss(pc.to(torch.bfloat16)), -pc)
    assert sft_loss(pc.to(torch.bfloat16)).dtype == torch.float32
    torch.testing.assert_close(implicit_rewards(pc, rc, 0.5), torch.tensor([0.125, -0.25, 0.1875, -0.125]))
    torch.testing.assert_close(implicit_rewards(pc, None, 2.0), 2 * pc)
