"""Advantage estimators: where PPO, GRPO and RLOO differ. Everything else is shared (losses.py).

Notation (one episode): the policy wrote tokens a_1 … a_N (observation tokens are the env's moves,
not time steps of the policy); r_k is the reward on a_k — a turn's reward sits on its last token,
0 elsewhere; V_k is the critic's value of the state before a_k.

PPO — token-level GAE (Schulman et al. 2016) over the policy's tokens, V_{N+1} = 0 at the end:
    δ_k = r_k + γ V_{k+1} − V_k
    A_k = δ_k + γ λ A_{k+1}            returns R_k = A_k + V_k (the value target)

GRPO (Shao et al. 2024) and RLOO (Ahmadian et al. 2024) — no critic; G episodes of one task form a
group. Each token's return-to-go is G_k = Σ_{j≥k} γ^{j−k} r_j; the baseline comes from the
episode returns R^(i) = G_1^(i) of the group:
    GRPO:  A_k^(i) = (G_k^(i) − mean_j R^(j)) / (std_j R^(j) + ε)     (÷std switchable)
    RLOO:  A_k^(i) = G_k^(i) − 1/(G−1) Σ_{j≠i} R^(j)
With sparse rewards and γ = 1, G_k = R for every token: the papers' episode-level advantages. With
dense rewards, a token is credited only with the progress made from its turn on.

`rl.group_credit: episode` uses R in place of G_k. That is the same estimator with the state-
dependent baseline b − C_k, C_k = the rewards already earned before token k (a function of the
past, so still unbiased): G_k − (b − C_k) = R − b. It matters with dense rewards, where G_k ≤ R
makes every token after the first progress look worse than the group mean even in a group that
all won (docs/rl.md).

`compute_advantages` is the one place that dispatches on `rl.algo`.
"""
from __future__ import annotations

import torch


def compute_advantages(algo: str, rewards: torch.Tensor, mask: torch.Tensor, values: torch.Tensor | None,
                       groups: torch.Tensor, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages A, value targets R) [E, T], zero off the policy's tokens.

    rewards, mask [E, T] (mask: 1 on the policy's tokens; each episode's time steps are its policy
    tokens, in order — observation tokens between turns are skipped, not steps); values [E, T] the
    critic's V_old (PPO; None otherwise); groups [E] the task of each episode; cfg the RLConfig.
    """
    steps = [m.nonzero().flatten() for m in mask]  # per episode: the positions of a_1 … a_N
    adv, ret = torch.zeros_like(mask), torch.zeros_like(mask)
    if algo == "ppo":
        for i, idx in enumerate(steps):
            adv[i, idx], ret[i, idx] = gae(rewards[i, idx], values[i, idx], cfg.gamma, cfg.lam)
        if cfg.normalize_advantages:  # whiten over every policy token of the batch
            on = mask.bool()
            mean, std = adv[on].mean(), adv[on].std(unbiased=False)
            adv = torch.where(on, (adv - mean) / (std + 1e-6), adv)
        return adv, ret
    if algo not in ("grpo", "rloo"):
        raise ValueError(f"unknown rl.algo {algo!r}; use 'ppo', 'grpo' or 'rloo'")
    episode_returns = rewards.sum(-1)  # R^(i)
    baseline, scale = group_baselines(episode_returns, groups, algo, cfg.std_normalize)
    for i, idx in enumerate(steps):
        if cfg.group_credit == "episode":
            g = episode_returns[i].expand(idx.numel())  # R in place of G_k (see the module docstring)
        else:
            g = returns_to_go(rewards[i, idx], cfg.gamma)  # G_k
        adv[i, idx] = (g - baseline[i]) / scale[i]
    return adv, ret  # no critic: ret stays 0 (nothing regresses on it)


def gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """rewards, values [N] over one episode's policy tokens -> (advantages [N], returns [N])."""
    n = rewards.shape[0]
    adv = torch.zeros_like(rewards)
    next_value, next_adv = 0.0, 0.0
    for k in range(n - 1, -1, -1):
        delta = rewards[k] + gamma * next_value - values[k]
        next_adv = delta + gamma * lam * next_adv
        adv[k] = next_adv
        next_value = values[k]
    return adv, adv + values


def returns_to_go(rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    """[N] -> [N]: G_k = Σ_{j≥k} γ^{j−k} r_j."""
    out = torch.zeros_like(rewards)
    running = 0.0
    for k in range(rewards.shape[0] - 1, -1, -1):
        running = rewards[k] + gamma * running
        out[k] = running
    return out


def group_baselines(episode_returns: torch.Tensor, groups: torch.Tensor, kind: str,
                    std_normalize: bool = True, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(baseline [E], scale [E]) per episode: A = (G − baseline) / scale.

    kind "grpo": baseline = group mean, scale = group std (population std, as GRPO) + eps if
    std_normalize else 1; a group whose returns are all equal has no spread to normalise by and
    keeps scale 1 (with sparse rewards its advantages are 0 anyway; with dense ones dividing the
    turn-level differences by ~0 would blow them up). kind "rloo": baseline = mean of the *other*
    members, scale = 1. A group of one has baseline = its own return (no signal) under both.
    """
    baseline = torch.empty_like(episode_returns)
    scale = torch.ones_like(episode_returns)
    for g in groups.unique():
        idx = (groups == g).nonzero().flatten()
        r = episode_returns[idx]
        n = r.numel()
        if n == 1:
            baseline[idx] = r
            continue
        if kind == "grpo":
            baseline[idx] = r.mean()
            std = r.std(unbiased=False)
            if std_normalize and std > eps:
                scale[idx] = std + eps
        elif kind == "rloo":
            baseline[idx] = (r.sum() - r) / (n - 1)
        else:
            raise ValueError(f"unknown group baseline {kind!r}; use 'grpo' or 'rloo'")
    return baseline, scale


# -- what the loop logs of the advantages (docs/rl.md, "Reading an update") -----------------------

def zero_variance_share(episode_returns: torch.Tensor, groups: torch.Tensor, eps: float = 1e-6) -> float:
    """The share of groups (of two or more episodes) whose returns are all equal: under GRPO/RLOO
    with sparse rewards their advantages are 0, so they teach nothing."""
    flat, total = 0, 0
    for g in groups.unique():
        r = episode_returns[groups == g]
        if r.numel() > 1:
            total += 1
            flat += bool(r.max() - r.min() <= eps)
    return flat / total if total else 0.0


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 − Var(R − V) / Var(R) over the policy's tokens: 1 = the critic predicts the value targets,
    0 = no better than their mean, < 0 = worse (PPO's critic, before the update)."""
    on = mask.bool()
    r, v = returns[on].double(), values[on].double()
    var = r.var(unbiased=False)
    return float(1 - (r - v).var(unbiased=False) / var) if var > 0 else float("nan")


def turn_index(mask: torch.Tensor) -> torch.Tensor:
    """[E, T] -> [E, T]: on each policy token the 1-based index of its turn (a turn is a run of
    policy tokens), 0 off them."""
    m = mask.long()
    starts = m * (1 - torch.nn.functional.pad(m, (1, 0))[:, :-1])  # 1 where a run of policy tokens begins
    return starts.cumsum(-1) * m


def advantage_by_turn(adv: torch.Tensor, mask: torch.Tensor, turns: int = 3) -> dict[str, float]:
    """Mean advantage of the policy's tokens in each of the first `turns` turns and in each
    episode's last turn: how the credit spreads over the turns."""
    idx = turn_index(mask)
    out = {}
    for k in range(1, turns + 1):
        sel = idx == k
        if sel.any():
            out[f"adv_turn{k}"] = float(adv[sel].mean())
    last = idx == idx.max(-1, keepdim=True).values
    sel = last & mask.bool()
    if sel.any():
        out["adv_turn_last"] = float(adv[sel].mean())
    return out

