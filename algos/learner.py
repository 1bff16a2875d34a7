"""The RL learner: turns a batch of trajectories into one policy update on a DeepSpeed engine.

    update(trajectories):
        1. one no-grad pass: log π_old (the learner's own log-probs before the update), the critic's
           values V_old (PPO) and log π_ref (when kl_coef > 0). Skipped when the update is exactly
           on-policy (GRPO/RLOO, one epoch, one mini-batch: no optimizer step happens before the
           last forward, so π_old is the gradient pass's own log-probs, detached; π_ref is then
           computed next to each micro-batch)
        2. advantages (algos/advantages.py): GAE for PPO, group baselines for GRPO / RLOO
        3. `epochs` passes of shuffled mini-batches (`minibatch_size` episodes per optimizer step,
           `micro_batch_size` per forward; DeepSpeed accumulates), losses from algos/losses.py

Token alignment: the logits at position t predict token t+1, so every per-token array is used
shifted by one (`[:, 1:]`): the mask says which predicted tokens the policy wrote. Tokens drawn by
constrained decoding (rollout.constrain_actions) are scored under the same mask (`Batch.constrain`).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from algos.advantages import gae, group_baselines, returns_to_go
from algos.config import Experiment
from algos.losses import (
    clipped_policy_loss,
    clipped_value_loss,
    kl_penalty,
    logprobs_and_entropy,
    loss_weights,
    masked_mean,
    tis_weight,
    token_logprobs,
)
from algos.runtime import init_deepspeed, param_dtype, resolve_device
from rollout.engine import mask_logits
from rollout.trajectory import Trajectory


def build_critic(policy: nn.Module) -> nn.Module:
    """A value model with the policy's architecture and starting weights, and a zero scalar head."""
    from transformers import AutoModelForTokenClassification

    cfg = copy.deepcopy(policy.config)
    cfg.num_labels = 1
    critic = AutoModelForTokenClassification.from_config(cfg)
    critic.model.load_state_dict(policy.model.state_dict())
    nn.init.zeros_(critic.score.weight)
    if critic.score.bias is not None:
        nn.init.zeros_(critic.score.bias)
    return critic.to(next(policy.parameters()).device)


class ActorCritic(nn.Module):
    """The trainable module: the policy, plus a critic for PPO (one DeepSpeed engine for both)."""

    def __init__(self, policy: nn.Module, critic: nn.Module | None):
        super().__init__()
        self.policy, self.critic = policy, critic

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        logits = self.policy(input_ids=input_ids, attention_mask=attention_mask).logits  # [B, T, V]
        values = None
        if self.critic is not None:
            values = self.critic(input_ids=input_ids, attention_mask=attention_mask).logits.squeeze(-1)  # [B, T]
        return logits, values


@dataclass
class Batch:
    """Right-padded tensors of a set of episodes, already shifted for next-token prediction."""

    input_ids: torch.Tensor  # [E, T]
    attention_mask: torch.Tensor  # [E, T]
    mask: torch.Tensor  # [E, T-1] 1 where the predicted token is the policy's
    behaviour_logp: torch.Tensor  # [E, T-1] engine log-probs of those tokens
    rewards: torch.Tensor  # [E, T-1]
    groups: torch.Tensor  # [E]
    # constrained decoding: per episode, {shifted position: allowed token ids} (empty = free)
    choice_sets: list[dict[int, list[int]]] | None = None

    @staticmethod
    def from_trajectories(trajs: list[Trajectory], pad_id: int) -> Batch:
        e, t = len(trajs), max(len(tr.token_ids) for tr in trajs)
        ids = torch.full((e, t), pad_id, dtype=torch.long)
        am = torch.zeros((e, t), dtype=torch.long)
        pm, lp, rw = (torch.zeros((e, t)) for _ in range(3))
        for i, tr in enumerate(trajs):
            n = len(tr.token_ids)
            ids[i, :n] = torch.tensor(tr.token_ids)
            am[i, :n] = 1
            pm[i, :n] = torch.tensor(tr.policy_mask, dtype=torch.float)
            lp[i, :n] = torch.tensor(tr.logprobs)
            rw[i, :n] = torch.tensor(tr.rewards)
        choices = [{pos - 1: ids for pos, ids in tr.choice_sets.items()} for tr in trajs]
        return Batch(ids, am, pm[:, 1:], lp[:, 1:], rw[:, 1:], torch.tensor([tr.group for tr in trajs]),
                     choices if any(choices) else None)

    def constrain(self, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Logits [B, T-1, V] of `rows`, masked to the choices the engine sampled from (if any), so
        every log-prob, ratio, KL and entropy is the constrained policy's: exactly what was played."""
        if self.choice_sets is None:
            return logits
        where = [(b, pos, ids) for b, r in enumerate(rows.tolist()) for pos, ids in self.choice_sets[r].items()]
        if not where:
            return logits
        b_idx = torch.tensor([w[0] for w in where], device=logits.device)
        t_idx = torch.tensor([w[1] for w in where], device=logits.device)
        picked = mask_logits(logits[b_idx, t_idx], [w[2] for w in where])  # [K, V] fp32
        return logits.float().index_put((b_idx, t_idx), picked)


class Learner:
    def __init__(self, exp: Experiment, policy: nn.Module, pad_token_id: int, optimizer_cls=torch.optim.AdamW):
        self.exp, self.cfg = exp, exp.rl
        self.device = resolve_device(exp.runtime)
        self.pad_id = pad_token_id
        policy = policy.to(self.device, param_dtype(exp.runtime.precision))
        critic = build_critic(policy) if self.cfg.algo == "ppo" else None
        # The reference is a frozen copy of the start policy, kept only when the KL term is on.
        self.reference = copy.deepcopy(policy).eval().requires_grad_(False) if self.cfg.kl_coef > 0 else None
        module = ActorCritic(policy, critic)
        optimizer = optimizer_cls(module.parameters(), lr=self.cfg.lr, betas=self.cfg.betas,
                                  weight_decay=self.cfg.weight_decay)
        warm = self.cfg.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
        self.grad_accum = math.ceil(self.cfg.minibatch_size / self.cfg.micro_batch_size)
        self.engine = init_deepspeed(module, optimizer, scheduler, exp.runtime, self.cfg.micro_batch_size,
                                     self.grad_accum, self.cfg.grad_clip)
        # Skip the no-grad π_old pass when it cannot differ from the gradient pass (see the module
        # docstring); False forces the pass (tests compare both).
        self.fast_on_policy = True

    @property
    def policy(self) -> nn.Module:
        return self.engine.module.policy

    def policy_state_dict(self) -> dict[str, torch.Tensor]:
        """fp32 CPU copy of the policy weights (what rollout engines load)."""
        module = self.policy
        if self.engine.zero_optimization_stage() == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
        return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}

    # -- the update -----------------------------------------------------------------------------

    def _forward(self, batch: Batch, rows: torch.Tensor, grad: bool):
        """Logits and values of `rows`, trimmed to their longest sequence."""
        t = int(batch.attention_mask[rows].sum(-1).max())
        ids = batch.input_ids[rows, :t].to(self.device)
        am = batch.attention_mask[rows, :t].to(self.device)
        if grad:
            logits, values = self.engine(ids, am)
        else:
            with torch.no_grad(), self._autocast():
                logits, values = self.engine.module(ids, am)
        logits = batch.constrain(logits[:, :-1], rows)
        return ids, logits, (None if values is None else values[:, :-1].float()), t

    def _autocast(self):
        precision = self.exp.runtime.precision
        if precision.startswith("amp_"):
            dtype = torch.bfloat16 if precision == "amp_bf16" else torch.float16
            return torch.autocast(self.device.type, dtype=dtype)
        return torch.autocast(self.device.type, enabled=False)

    @torch.no_grad()
    def _old_pass(self, batch: Batch):
        e, t1 = batch.mask.shape
        old_logp, ref_logp, values = torch.zeros(e, t1), torch.zeros(e, t1), torch.zeros(e, t1)
        order = torch.arange(e)
        for rows in order.split(self.cfg.micro_batch_size):
            ids, logits, v, t = self._forward(batch, rows, grad=False)
            old_logp[rows, : t - 1] = token_logprobs(logits, ids[:, 1:]).cpu()
            if v is not None:
                values[rows, : t - 1] = v.cpu()
            if self.reference is not None:
                ref_logp[rows, : t - 1] = self._ref_logp(batch, rows, ids, t)
        return old_logp, ref_logp, values

    @torch.no_grad()
    def _ref_logp(self, batch: Batch, rows: torch.Tensor, ids: torch.Tensor, t: int) -> torch.Tensor:
        with self._autocast():
            ref_logits = batch.constrain(self.reference(input_ids=ids, attention_mask=batch.attention_mask[rows, :t].to(
                self.device)).logits[:, :-1], rows)
        return token_logprobs(ref_logits, ids[:, 1:]).cpu()

    def on_policy(self, n_episodes: int) -> bool:
        """True when this update takes exactly one optimizer step with no critic: π_old = π_θ."""
        cfg = self.cfg
        return self.fast_on_policy and cfg.algo != "ppo" and cfg.epochs == 1 and n_episodes <= cfg.minibatch_size

    def advantages(self, batch: Batch, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(advantages, value targets) [E, T-1], zero off the policy's tokens."""
        cfg = self.cfg
        adv, ret = torch.zeros_like(batch.mask), torch.zeros_like(batch.mask)
        if cfg.algo == "ppo":
            for i in range(batch.mask.shape[0]):
                idx = batch.mask[i].nonzero().flatten()
                a, r = gae(batch.rewards[i, idx], values[i, idx], cfg.gamma, cfg.lam)
                adv[i, idx], ret[i, idx] = a, r
            if cfg.normalize_advantages:
                on = batch.mask.bool()
                mean, std = adv[on].mean(), adv[on].std(unbiased=False)
                adv = torch.where(on, (adv - mean) / (std + 1e-6), adv)
            return adv, ret
        episode_returns = batch.rewards.sum(-1)
        baseline, scale = group_baselines(episode_returns, batch.groups, cfg.algo, cfg.std_normalize)
        for i in range(batch.mask.shape[0]):
            idx = batch.mask[i].nonzero().flatten()
            if cfg.group_credit == "episode":
                g = episode_returns[i].expand(idx.numel())
            else:
                g = returns_to_go(batch.rewards[i, idx], cfg.gamma)
            adv[i, idx] = (g - baseline[i]) / scale[i]
        return adv, ret

    def update(self, trajs: list[Trajectory], seed: int = 0) -> dict[str, float]:
        """One RL update on these episodes (infra-error episodes must already be dropped)."""
        if not trajs:
            return {}
        cfg = self.cfg
        t0 = time.perf_counter()
        batch = Batch.from_trajectories(trajs, self.pad_id)
        fast = self.on_policy(batch.mask.shape[0])
        if fast:  # π_old, π_ref and the TIS weights are filled in by each micro-step
            old_logp, ref_logp, old_values = (torch.zeros_like(batch.mask) for _ in range(3))
            is_w = torch.ones_like(batch.mask)
        else:
            self.engine.eval()
            old_logp, ref_logp, old_values = self._old_pass(batch)
            is_w = tis_weight(old_logp, batch.behaviour_logp, cfg.tis_cap)
        adv, ret = self.advantages(batch, old_values)
        self.engine.train()

        sums: dict[str, float] = {}
        n_micro = 0
        gen = torch.Generator().manual_seed(seed)
        e = batch.mask.shape[0]
        for _ in range(cfg.epochs):
            perm = torch.randperm(e, generator=gen)
            for mb in perm.split(cfg.minibatch_size):
                # exactly grad_accum micro-batches per optimizer step (DeepSpeed counts them)
                for rows in np.array_split(mb.numpy(), self.grad_accum):
                    rows = torch.as_tensor(rows, dtype=torch.long)
                    if rows.numel() == 0:  # a short last mini-batch: repeat a row with zero weight
                        rows, weight = mb[:1], 0.0
                    else:
                        weight = 1.0
                    stats = self._micro_step(batch, rows, old_logp, ref_logp, old_values, adv, ret, is_w, weight,
                                             fast)
                    for k, v in stats.items():
                        sums[k] = sums.get(k, 0.0) + v
                    n_micro += 1
        metrics = {k: v / n_micro for k, v in sums.items()}
        on = batch.mask.bool()
        metrics.update({
            "tis_weight": float(is_w[on].mean()) if on.any() else 1.0,
            "logp_gap": float((old_logp - batch.behaviour_logp)[on].abs().mean()) if on.any() else 0.0,
            "adv_mean": float(adv[on].mean()) if on.any() else 0.0,
            "adv_std": float(adv[on].std()) if on.sum() > 1 else 0.0,
            "lr": self.engine.get_lr()[0],
            "old_pass": 0.0 if fast else 1.0,
            "update_s": time.perf_counter() - t0,
            "train_tokens": float(batch.attention_mask.sum()) * cfg.epochs,
        })
        return metrics

    def _micro_step(self, batch, rows, old_logp, ref_logp, old_values, adv, ret, is_w, weight,
                    fast: bool) -> dict[str, float]:
        cfg = self.cfg
        ids, logits, values, t = self._forward(batch, rows, grad=True)
        sl = (rows, slice(0, t - 1))
        token_w = loss_weights(batch.mask[sl].to(self.device), cfg.loss_aggregation)  # [B, T-1], sums to 1
        logp, ent = logprobs_and_entropy(logits, ids[:, 1:], entropy_grad=cfg.entropy_coef > 0)
        if fast:  # on-policy: π_old is this very forward (ratio 1, gradient of ρ = ∇ log π)
            old_logp[sl] = logp.detach().cpu()
            is_w[sl] = tis_weight(old_logp[sl], batch.behaviour_logp[sl], cfg.tis_cap)
            if self.reference is not None:
                ref_logp[sl] = self._ref_logp(batch, rows, ids, t)
        pg_loss, clipfrac = clipped_policy_loss(logp, old_logp[sl].to(self.device), adv[sl].to(self.device), token_w,
                                                cfg.clip_eps, is_w[sl].to(self.device))
        loss = pg_loss
        stats = {"policy_loss": pg_loss.item(), "clip_frac": clipfrac.item()}
        if values is not None:
            v_loss = clipped_value_loss(values, old_values[sl].to(self.device), ret[sl].to(self.device), token_w,
                                        cfg.value_clip)
            loss = loss + cfg.vf_coef * v_loss
            stats["value_loss"] = v_loss.item()
        with torch.no_grad():
            stats["kl_old"] = float(masked_mean(old_logp[sl].to(self.device) - logp, token_w))
        if self.reference is not None:
            kl = masked_mean(kl_penalty(logp, ref_logp[sl].to(self.device), cfg.kl_estimator), token_w)
            loss = loss + cfg.kl_coef * kl
            stats["kl_ref"] = kl.item()
        ent = masked_mean(ent, token_w)
        if cfg.entropy_coef > 0:
            loss = loss - cfg.entropy_coef * ent
        stats["entropy"] = ent.item()
        self.engine.backward(loss * weight)
        self.engine.step()
        return stats
