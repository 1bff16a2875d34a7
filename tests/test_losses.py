"""Each loss of algos/losses.py against values computed by hand, and the KL term's gradient
against the exact KL of a small categorical policy."""
from __future__ import annotations

import math

import pytest
import torch

from algos.losses import (
    clipped_policy_loss,
    clipped_value_loss,
    kl_k3,
    kl_loss,
    logprobs_and_entropy,
    tis_weight,
    weighted_sum,
)


def test_clipped_policy_loss_by_hand():
    # four tokens, ε = 0.2: ratios 1.5 (A>0: clipped to 1.2), 0.5 (A>0: min keeps 0.5),
    # 1.5 (A<0: min keeps 1.5·A), 0.5 (A<0: clipped to 0.8)
    ratio = torch.tensor([1.5, 0.5, 1.5, 0.5])
    old = torch.full((4,), -2.0)
    logp = old + ratio.log()
    adv = torch.tensor([1.0, 2.0, -1.0, -2.0])
    tis = torch.tensor([1.0, 0.5, 2.0, 1.0])
    weights = torch.tensor([0.1, 0.2, 0.3, 0.4])
    surrogate = [1.2 * 1.0, 0.5 * 2.0, 1.5 * -1.0, 0.8 * -2.0]
    want = sum(-s * t * w for s, t, w in zip(surrogate, tis.tolist(), weights.tolist()))
    loss, clip_frac = clipped_policy_loss(logp, old, adv, weights, 0.2, tis)
    assert float(loss) == pytest.approx(want, rel=1e-6)
    assert float(clip_frac) == pytest.approx(1.0)  # every ratio is outside [0.8, 1.2]; weights sum to 1
    _, clip_frac = clipped_policy_loss(old + torch.tensor([1.1, 1.0, 0.5, 2.0]).log(), old, adv, weights, 0.2, tis)
    assert float(clip_frac) == pytest.approx(0.3 + 0.4)


def test_policy_loss_gradient_at_ratio_one_is_the_policy_gradient():
    logp = torch.tensor([-1.0, -2.0], requires_grad=True)
    adv, weights = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 0.5])
    loss, _ = clipped_policy_loss(logp, logp.detach(), adv, weights, 0.2, torch.ones(2))
    loss.backward()
    torch.testing.assert_close(logp.grad, -adv * weights)  # ∇ρ = ∇ log π at ρ = 1


def test_tis_weight_by_hand():
    old, behaviour = torch.tensor([-1.0, -1.0, -3.0]), torch.tensor([-1.5, -0.5, -1.0])
    torch.testing.assert_close(tis_weight(old, behaviour, 2.0),
                               torch.tensor([math.exp(0.5), math.exp(-0.5), math.exp(-2.0)]))
    torch.testing.assert_close(tis_weight(old, behaviour, 1.2), torch.tensor([1.2, math.exp(-0.5), math.exp(-2.0)]))
    assert torch.equal(tis_weight(old, behaviour, 0.0), torch.ones(3))


def test_clipped_value_loss_by_hand():
    values = torch.tensor([1.0, 0.0, 0.5])
    old = torch.tensor([0.5, 0.5, 0.5])
    returns = torch.tensor([2.0, 1.0, 0.0])
    weights = torch.tensor([0.5, 0.25, 0.25])
    # clip 0.2: V_clip = (0.7, 0.3, 0.5); per token max((V−R)², (V_clip−R)²) = (1.69, 1.0, 0.25)
    want = 0.5 * (0.5 * 1.69 + 0.25 * 1.0 + 0.25 * 0.25)
    assert float(clipped_value_loss(values, old, returns, weights, 0.2)) == pytest.approx(want, rel=1e-6)
    unclipped = 0.5 * (0.5 * 1.0 + 0.25 * 1.0 + 0.25 * 0.25)
    assert float(clipped_value_loss(values, old, returns, weights, 0.0)) == pytest.approx(unclipped, rel=1e-6)


def test_entropy_and_k3_by_hand():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [math.log(3.0), 0.0, -1e9, -1e9]]])  # [1, 2, 4]
    logp, ent = logprobs_and_entropy(logits, torch.tensor([[2, 0]]), entropy_grad=False)
    torch.testing.assert_close(logp, torch.tensor([[math.log(0.25), math.log(0.75)]]))
    h2 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    torch.testing.assert_close(ent, torch.tensor([[math.log(4.0), h2]]))
    u = torch.tensor([0.5, -0.25])  # log π_θ − log π_ref
    torch.testing.assert_close(kl_k3(u, torch.zeros(2)), torch.exp(-u) + u - 1)
    assert float(weighted_sum(torch.tensor([1.0, 3.0]), torch.tensor([0.25, 0.25]))) == 1.0


# -- the KL term's gradient, exactly --------------------------------------------------------------


def _expected_gradient(per_action_loss, theta, old_logp):
    """Σ_a π_old(a) ∇_θ loss(a): the expectation over tokens drawn by π_old, computed exactly."""
    grad = torch.zeros_like(theta)
    for a in range(theta.numel()):
        t = theta.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(per_action_loss(torch.log_softmax(t, -1)[a], a), t)
        grad += old_logp[a].exp() * g
    return grad


@pytest.mark.parametrize("off_policy", [False, True])
def test_kl_term_gradient_is_that_of_kl_to_the_reference(off_policy):
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(6, generator=gen, dtype=torch.float64)
    ref_logp = torch.log_softmax(torch.randn(6, generator=gen, dtype=torch.float64), -1)
    # the samples' policy: π_θ itself, or an older one (one epoch later, as PPO's second pass)
    old_logits = theta + 0.5 * torch.randn(6, generator=gen, dtype=torch.float64) if off_policy else theta
    old_logp = torch.log_softmax(old_logits, -1)

    t = theta.clone().requires_grad_(True)
    logp_all = torch.log_softmax(t, -1)
    (exact,) = torch.autograd.grad((logp_all.exp() * (logp_all - ref_logp)).sum(), t)  # ∇ KL(π_θ ‖ π_ref)
    one = torch.ones((), dtype=torch.float64)

    got = _expected_gradient(lambda logp, a: kl_loss(logp, old_logp[a], ref_logp[a], one, one), theta, old_logp)
    torch.testing.assert_close(got, exact, rtol=1e-9, atol=1e-12)

    # the estimators used as losses before: k1 regularises nothing, k3 pulls along the other KL
    k1 = _expected_gradient(lambda logp, a: logp - ref_logp[a], theta, old_logp)
    k3 = _expected_gradient(lambda logp, a: kl_k3(logp, ref_logp[a]), theta, old_logp)
    assert not torch.allclose(k1, exact, atol=1e-3) and not torch.allclose(k3, exact, atol=1e-3)
    if not off_policy:
        torch.testing.assert_close(k1, torch.zeros(6, dtype=torch.float64), atol=1e-12, rtol=0)
        t = theta.clone().requires_grad_(True)
        (reverse,) = torch.autograd.grad((ref_logp.exp() * (ref_logp - torch.log_softmax(t, -1))).sum(), t)
        torch.testing.assert_close(k3, reverse, rtol=1e-9, atol=1e-12)  # ∇ KL(π_ref ‖ π_θ)
