"""The losses PPO, GRPO and RLOO share, per policy token (masked means over a mini-batch).

    ratio     ρ = π_θ(a|s) / π_old(a|s)                       π_old: the learner before this update
    policy    L_clip = −min(ρ A, clip(ρ, 1−ε, 1+ε) A) · w      (Schulman et al. 2017)
    TIS       w = min(π_old(a|s) / μ(a|s), C)                  μ: the rollout engine that sampled a;
                                                               truncated importance sampling corrects
                                                               the engine/learner mismatch (Yao et al. 2025)
    value     L_V = ½ max((V − R)², (V_old + clip(V − V_old, −ε_v, ε_v) − R)²)      (PPO only)
    KL        k1 = log π_θ − log π_ref;  k3 = e^{log π_ref − log π_θ} − (log π_ref − log π_θ) − 1
    entropy   H = −Σ_v π_θ(v|s) log π_θ(v|s)

    loss = L_clip + c_v L_V + β KL − c_H H
"""
from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ x·mask / Σ mask: a 0/1 mask gives the mean over its tokens, `loss_weights` a weighted one."""
    return (x * mask).sum() / mask.sum().clamp(min=1e-12)


def loss_weights(mask: torch.Tensor, aggregation: str) -> torch.Tensor:
    """Per-token weights [B, T] summing to 1 that turn per-token terms into the loss.

    token    every policy token of the micro-batch weighs the same: a long episode counts more
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


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                        clip_eps: float, is_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, clip fraction), both masked means over policy tokens."""
    ratio = torch.exp(logp - old_logp)
    surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv)
    per_token = -surrogate if is_weight is None else -surrogate * is_weight
    clipped = ((ratio - 1).abs() > clip_eps).float()
    return masked_mean(per_token, mask), masked_mean(clipped, mask)


def tis_weight(old_logp: torch.Tensor, behaviour_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance weight min(π_old / μ, C); cap 0 disables (all ones)."""
    if cap <= 0:
        return torch.ones_like(old_logp)
    return torch.exp(old_logp - behaviour_logp).clamp(max=cap)


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       clip: float) -> torch.Tensor:
    unclipped = (values - returns) ** 2
    if clip <= 0:
        return 0.5 * masked_mean(unclipped, mask)
    clipped = (old_values + torch.clamp(values - old_values, -clip, clip) - returns) ** 2
    return 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(π_θ ‖ π_ref) from samples of π_θ."""
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k3":
        d = ref_logp - logp
        return torch.exp(d) - d - 1
    raise ValueError(f"unknown KL estimator {estimator!r}; use 'k1' or 'k3'")
