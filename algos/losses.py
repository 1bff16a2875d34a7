"""The losses PPO, GRPO and RLOO share, per policy token, summed with loss weights.

    ratio     ρ = π_θ(a|s) / π_old(a|s)                       π_old: the learner before this update
    policy    L_clip = −min(ρ A, clip(ρ, 1−ε, 1+ε) A) · w      (Schulman et al. 2017)
    TIS       w = min(π_old(a|s) / μ(a|s), C)                  μ: the rollout engine that sampled a;
                                                               truncated importance sampling corrects
                                                               the engine/learner mismatch (Yao et al. 2025)
    value     L_V = ½ max((V − R)², (V_old + clip(V − V_old, −ε_v, ε_v) − R)²)      (PPO only)
    KL        L_KL = sg(ρ w) · ½ (log π_θ − log π_ref)²        its gradient is ∇ KL(π_θ ‖ π_ref)
    entropy   H = −Σ_v π_θ(v|s) log π_θ(v|s)

    loss = L_clip + β L_KL − c_H H          (the critic's c_v L_V is its own loss, own optimiser)

Every term is Σ_tokens term · weight, with `loss_weights` that sum to 1 over a whole mini-batch:
a micro-batch contributes its share, so the sum of the micro-batches' losses is the mini-batch's
loss whatever the micro-batch size.

The KL term. The tokens were drawn by μ ≈ π_old, not by π_θ, and the term must pull π_θ towards
π_ref: its expected gradient over those samples must be ∇_θ KL(π_θ ‖ π_ref). With u = log π_θ −
log π_ref (per token),
    ∇ KL(π_θ ‖ π_ref) = E_{a~π_θ}[u ∇log π_θ]   (the E[∇log π_θ] = 0 term drops)
                      = E_{a~π_old}[ρ u ∇log π_θ],
which is the gradient of sg(ρ)·½u² (sg = stop-gradient): the "k2" estimator ½u², importance-
weighted; w carries the same μ → π_old correction as the policy term. The alternatives are wrong
as losses: k1 = u has E_{π_θ}[∇u] = E[∇log π_θ] = 0 (it regularises nothing), and k3 = e^{−u} + u − 1
has E_{π_θ}[∇k3] = ∇ KL(π_ref ‖ π_θ), the other direction (tests/test_losses.py checks all three on
an exact categorical). k3 stays as the *logged* value: a low-variance, nonnegative estimate of
the KL's size.
"""
from __future__ import annotations

import torch


def weighted_sum(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ x·weights. With `loss_weights` (summing to 1 over a mini-batch) a micro-batch's share of
    the mini-batch's weighted mean."""
    return (x * weights).sum()


def loss_weights(mask: torch.Tensor, aggregation: str) -> torch.Tensor:
    """Per-token weights [E, T] summing to 1 over these episodes (a whole mini-batch) that turn
    per-token terms into the loss; `mask` is 1 on the policy's tokens.

    token    every policy token of the mini-batch weighs the same: a long episode counts more
    episode  each episode's tokens share 1 / (episodes): the mean over its tokens, then over
             episodes, so a long failed search weighs no more than a short win
    """
    if aggregation == "token":
        return mask / mask.sum().clamp(min=1)
    if aggregation == "episode":
        per_episode = mask.sum(-1, keepdim=True)
        episodes = (per_episode > 0).sum().clamp(min=1)
        return mask / per_episode.clamp(min=1) / episodes
    raise ValueError(f"unknown loss aggregation {aggregation!r}; use 'token' or 'episode'")


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits [B, T, V], targets [B, T] -> log π(target) [B, T] (fp32)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def logprobs_and_entropy(logits: torch.Tensor, targets: torch.Tensor,
                         entropy_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(log π(target), H) [B, T] from one log-softmax of logits [B, T, V]; the entropy carries
    gradients only when it is part of the loss."""
    logp_all = torch.log_softmax(logits.float(), dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        ent = -(logp_all.exp() * logp_all).sum(-1)
    return logp, ent


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, weights: torch.Tensor,
                        clip_eps: float, tis_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_clip, clip fraction), both weighted sums over policy tokens."""
    ratio = torch.exp(logp - old_logp)
    surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv)
    clipped = ((ratio - 1).abs() > clip_eps).float()
    return weighted_sum(-surrogate * tis_weights, weights), weighted_sum(clipped, weights)


def tis_weight(old_logp: torch.Tensor, behaviour_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance weight min(π_old / μ, C); cap 0 disables (all ones)."""
    if cap <= 0:
        return torch.ones_like(old_logp)
    return torch.exp(old_logp - behaviour_logp).clamp(max=cap)


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, weights: torch.Tensor,
                       clip: float) -> torch.Tensor:
    unclipped = (values - returns) ** 2
    if clip <= 0:
        return 0.5 * weighted_sum(unclipped, weights)
    clipped = (old_values + torch.clamp(values - old_values, -clip, clip) - returns) ** 2
    return 0.5 * weighted_sum(torch.maximum(unclipped, clipped), weights)


def kl_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, weights: torch.Tensor,
            tis_weights: torch.Tensor) -> torch.Tensor:
    """L_KL = Σ sg(ρ w) · ½ (log π_θ − log π_ref)² · weights: its expected gradient over tokens
    drawn by π_old is ∇ KL(π_θ ‖ π_ref) (the module docstring derives it)."""
    rho = torch.exp(logp - old_logp).detach() * tis_weights
    return weighted_sum(rho * 0.5 * (logp - ref_logp) ** 2, weights)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 = e^{−u} + u − 1, u = log π_θ − log π_ref: the logged KL (never a loss)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1
