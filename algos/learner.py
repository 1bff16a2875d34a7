"""The RL learner: turns a batch of trajectories into one policy update on DeepSpeed engines.

    update(trajectories):
        0. infra-error episodes are dropped (they are counted by the loop, never scored)
        1. one no-grad pass: log π_old (the learner's own log-probs before the update), the critic's
           values V_old (PPO) and log π_ref (when kl_coef > 0), and the TIS weights — all stored on
           the `Batch`. Skipped when the update is exactly on-policy (GRPO/RLOO, one epoch, one
           mini-batch: no optimizer step happens before the last forward, so π_old is the gradient
           pass's own log-probs, detached; π_ref is then computed next to each micro-batch)
        2. advantages and value targets (algos/advantages.py: where PPO, GRPO and RLOO differ)
        3. `epochs` passes of shuffled mini-batches, one optimizer step each: the loss weights are
           normalised over the whole mini-batch, which is cut into micro-batches of at most
           `micro_batch_size` episodes whose gradients add up (the last one marks the accumulation
           boundary), so the step does not depend on the micro-batch size. Losses: algos/losses.py

The policy and PPO's critic are two DeepSpeed engines, each with its own optimizer, learning rate
(rl.lr, rl.critic_lr) and gradient clip (rl.grad_clip, rl.critic_grad_clip): a large value
gradient cannot shrink the policy step.

The learner scores the distribution the engine sampled from, softmax(logits / rollout.temperature)
(log-probs, ratios, KL and entropy alike); top-p sampling is refused for RL (algos/config.py).

Token alignment: the logits at position t predict token t+1, so every per-token array is used
shifted by one (`[:, 1:]`): the mask says which predicted tokens the policy wrote. Tokens drawn by
constrained decoding (rollout.constrain_actions) are scored under the same mask (`Batch.constrain`).

A mixture-of-experts policy (model.arch: moe) adds its load-balance loss (agents/moe.py) to the
policy's loss and logs the per-expert load; with rl.routing_replay every forward of the policy
and the reference routes each token the engine ran to the experts the engine chose.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from agents.model import MOE_KEYS, auxiliary_losses
from agents.moe import RouterTap, expert_stats
from algos.advantages import advantage_by_turn, compute_advantages, explained_variance, zero_variance_share
from algos.checkpoint import load_learner_state, save_checkpoint
from algos.config import Experiment, rl_sampling_error
from algos.losses import (
    clipped_policy_loss,
    clipped_value_loss,
    kl_k3,
    kl_loss,
    logprobs_and_entropy,
    loss_weights,
    tis_weight,
    token_logprobs,
    weighted_sum,
)
from algos.runtime import (
    all_reduce_sum,
    autocast,
    compile_for_training,
    dist_rank_world,
    full_state_dict,
    grad_norm,
    init_deepspeed,
    optimizer_options,
    param_dtype,
    resolve_runtime,
)
from rollout.engine import mask_logits
from rollout.trajectory import Trajectory


def build_critic(policy: nn.Module) -> nn.Module:
    """A value model with the policy's architecture and starting weights, and a zero scalar head.

    No dropout before the head (transformers' default for Llama is 0.1): V_old comes from an eval-
    mode pass, and a train-mode pass with dropout would regress a noisy V against it.
    """
    from transformers import AutoModelForTokenClassification

    cfg = copy.deepcopy(policy.config)
    cfg.num_labels = 1
    cfg.classifier_dropout = 0.0
    critic = AutoModelForTokenClassification.from_config(cfg)
    critic.model.load_state_dict(policy.model.state_dict())
    nn.init.zeros_(critic.score.weight)
    if critic.score.bias is not None:
        nn.init.zeros_(critic.score.bias)
    p = next(policy.parameters())
    return critic.to(p.device, p.dtype)


@dataclass
class Batch:
    """Right-padded tensors of a set of episodes, already shifted for next-token prediction, and
    the per-update tensors the learner computes before its gradient passes."""

    input_ids: torch.Tensor  # [E, T]
    attention_mask: torch.Tensor  # [E, T]
    mask: torch.Tensor  # [E, T-1] 1 where the predicted token is the policy's
    behaviour_logp: torch.Tensor  # [E, T-1] log μ: the engine's log-probs of those tokens
    rewards: torch.Tensor  # [E, T-1]
    groups: torch.Tensor  # [E]
    # constrained decoding: per episode, {shifted position: allowed token ids} (empty = free)
    choice_sets: list[dict[int, list[int]]] | None = None
    # routing replay: per token (unshifted, like input_ids) the experts the engine chose, −1 where
    # it recorded none (e.g. an episode's last token, never fed back) [E, T, layers, k]
    routed_experts: torch.Tensor | None = None
    # filled in by Learner.update, [E, T-1] each (π_old, π_ref and TIS stay None on the on-policy
    # fast path: each micro-step computes them from its own forward)
    old_logp: torch.Tensor | None = None  # log π_old
    ref_logp: torch.Tensor | None = None  # log π_ref (kl_coef > 0)
    old_values: torch.Tensor | None = None  # V_old (PPO)
    tis_weights: torch.Tensor | None = None  # min(π_old / μ, C)
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None  # the critic's targets (PPO)

    @staticmethod
    def from_trajectories(trajs: list[Trajectory], pad_id: int, routing: bool = False) -> Batch:
        """`routing`: also gather the trajectories' recorded experts (for routing replay)."""
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
                     choices if any(choices) else None, routed_experts(trajs, t) if routing else None)

    def by_length(self, rows: torch.Tensor) -> torch.Tensor:
        """The order of `rows` by sequence length (stable): micro-batches of similar lengths are
        padded less (multi-turn episodes here range from ~200 to ~1,200 tokens)."""
        return torch.argsort(self.attention_mask[rows].sum(-1), stable=True)

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


def routed_experts(trajs: list[Trajectory], length: int) -> torch.Tensor:
    """The trajectories' recorded experts as one tensor [E, length, layers, k], −1 where none."""
    shapes = [experts.shape[1:] for tr in trajs for _, experts in tr.routing]
    if not shapes:
        raise ValueError("rl.routing_replay: the episodes carry no routed experts (only the torch engine's "
                         "mixture-of-experts decoder records them)")
    out = torch.full((len(trajs), length, *shapes[0]), -1, dtype=torch.long)
    for i, tr in enumerate(trajs):
        for first, experts in tr.routing:
            n = min(len(experts), len(tr.token_ids) - first)  # an episode cut by its budget keeps fewer tokens
            out[i, first : first + n] = torch.as_tensor(experts[:n], dtype=torch.long)
    return out


class Learner:
    def __init__(self, exp: Experiment, policy: nn.Module, pad_token_id: int, optimizer_cls=torch.optim.AdamW):
        self.exp, self.cfg = exp, exp.rl
        error = rl_sampling_error(exp.rollout)
        if error:
            raise ValueError(error)
        self.temperature = exp.rollout.temperature
        self.device = resolve_runtime(exp.runtime)
        self.pad_id = pad_token_id
        self.optimizer_cls = optimizer_cls
        policy = policy.to(self.device, param_dtype(exp.runtime.precision))
        critic = build_critic(policy) if self.cfg.algo == "ppo" else None
        # The reference is a frozen copy of the start policy, kept only when the KL term is on.
        self.reference = copy.deepcopy(policy).eval().requires_grad_(False) if self.cfg.kl_coef > 0 else None
        self.engine = self._engine(policy, self.cfg.lr, self.cfg.grad_clip)
        self.critic_engine = None
        if critic is not None:
            self.critic_engine = self._engine(critic, self.cfg.critic_lr or self.cfg.lr,
                                              self.cfg.grad_clip if self.cfg.critic_grad_clip is None
                                              else self.cfg.critic_grad_clip)
        self.engines = [e for e in (self.engine, self.critic_engine) if e is not None]
        # Data parallelism (learner.num_ranks > 1, algos/ranks.py): every rank holds the whole batch
        # and computes the same advantages; each scores and trains on its share of the episodes
        # (`_shard`), and DeepSpeed averages the gradients over the ranks at each step.
        self.rank, self.world = dist_rank_world()
        # a mixture of experts' balance loss weight (the recipe's; the default if it names another arch)
        self.balance_coef = exp.model.balance_coef if exp.model.balance_coef is not None else MOE_KEYS["balance_coef"]
        # Skip the no-grad π_old pass when it cannot differ from the gradient pass (see the module
        # docstring); False forces the pass (tests compare both).
        self.fast_on_policy = True

    def _engine(self, module: nn.Module, lr: float, grad_clip: float):
        cfg = self.cfg
        runtime = self.exp.runtime
        optimizer = self.optimizer_cls(module.parameters(), lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                                       **optimizer_options(runtime, self.optimizer_cls))
        warm = cfg.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
        # DeepSpeed's own accumulation count is 1: update() marks each mini-batch's last micro-batch
        # as the accumulation boundary itself (a mini-batch may hold any number of micro-batches).
        engine = init_deepspeed(module, optimizer, scheduler, runtime, cfg.micro_batch_size, 1, grad_clip)
        compile_for_training(engine.module, runtime, self.device)
        return engine

    @property
    def policy(self) -> nn.Module:
        return self.engine.module

    def policy_state_dict(self) -> dict[str, torch.Tensor]:
        """fp32 CPU copy of the policy weights (what rollout engines load)."""
        return full_state_dict(self.engine, torch.float32)

    def save(self, run_dir: str | Path, step: int, tokenizer, state: dict, keep: int) -> Path:
        """Checkpoint `step`: the policy's and the critic's engines, the policy folder, `state`."""
        return save_checkpoint(run_dir, step, self.engine, tokenizer, state, keep, critic=self.critic_engine)

    def load(self, ck: Path) -> dict:
        """Restore the engines from checkpoint `ck`; returns the loop state saved beside them."""
        return load_learner_state(ck, self.engine, self.critic_engine)

    def shutdown(self) -> None:
        """Nothing to release in-process (a LearnerGroup stops its ranks)."""

    # -- forwards -------------------------------------------------------------------------------

    def _rows(self, batch: Batch, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(input ids, attention mask) of `rows` on the device, trimmed to their longest sequence."""
        t = int(batch.attention_mask[rows].sum(-1).max())
        return batch.input_ids[rows, :t].to(self.device), batch.attention_mask[rows, :t].to(self.device), t

    def _router_tap(self, model, batch: Batch, rows: torch.Tensor, t: int) -> RouterTap:
        """Records `model`'s routing over these rows (nothing on a dense model) and, under
        rl.routing_replay, routes each recorded token to the engine's experts."""
        replay = None
        if self.cfg.routing_replay:
            experts = batch.routed_experts[rows, :t]  # [B, t, L, k]
            replay = experts.permute(2, 0, 1, 3).reshape(experts.shape[2], -1, experts.shape[3]).to(self.device)
        return RouterTap(model, replay)

    def _logits(self, model, batch: Batch, rows: torch.Tensor, ids: torch.Tensor, am: torch.Tensor,
                tap: RouterTap | None = None) -> torch.Tensor:
        """[B, t-1, V] logits of the sampling distribution: / temperature, then the choice masks.
        `tap`: the router tap the forward runs under (one of `_router_tap` otherwise)."""
        with tap or self._router_tap(model, batch, rows, ids.shape[1]):
            logits = model(input_ids=ids, attention_mask=am).logits[:, :-1]
        if self.temperature != 1.0:
            logits = logits.float() / self.temperature
        return batch.constrain(logits, rows)

    @staticmethod
    def _values(critic, ids: torch.Tensor, am: torch.Tensor) -> torch.Tensor:
        return critic(input_ids=ids, attention_mask=am).logits.squeeze(-1)[:, :-1].float()  # [B, t-1]

    @torch.no_grad()
    def _ref_logp(self, batch: Batch, rows: torch.Tensor, ids: torch.Tensor, am: torch.Tensor) -> torch.Tensor:
        with autocast(self.exp.runtime.precision, self.device):
            return token_logprobs(self._logits(self.reference, batch, rows, ids, am), ids[:, 1:])

    @torch.no_grad()
    def score(self, batch: Batch):
        """The no-grad pass: (log π_old, log π_ref or None, V_old or None) [E, T-1] of `batch`."""
        e, t1 = batch.mask.shape
        old_logp = torch.zeros(e, t1)
        ref_logp = torch.zeros(e, t1) if self.reference is not None else None
        values = torch.zeros(e, t1) if self.critic_engine is not None else None
        mine, real = self._shard(torch.arange(e))
        order = batch.by_length(mine)
        mine, real = mine[order], real[order]
        for rows, keep in zip(mine.split(self.cfg.micro_batch_size), real.split(self.cfg.micro_batch_size)):
            ids, am, t = self._rows(batch, rows)
            with autocast(self.exp.runtime.precision, self.device):
                logp = token_logprobs(self._logits(self.engine.module, batch, rows, ids, am), ids[:, 1:])
                value = self._values(self.critic_engine.module, ids, am) if values is not None else None
            ref = self._ref_logp(batch, rows, ids, am) if ref_logp is not None else None
            # a padding row was scored only to keep the ranks in step: its numbers are dropped
            rows, keep = rows[keep], keep.to(logp.device)
            old_logp[rows, : t - 1] = logp[keep].cpu()
            if value is not None:
                values[rows, : t - 1] = value[keep].cpu()
            if ref is not None:
                ref_logp[rows, : t - 1] = ref[keep].cpu()
        for t in (old_logp, ref_logp, values):  # each rank filled its own rows: the sum has them all
            if t is not None:
                all_reduce_sum(t)
        return old_logp, ref_logp, values

    def _shard(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of `rows` (every world-th, from its rank) and a mask of the real ones:
        shares are padded to one length with repeats of the first row (mask False), so that every
        rank runs the same number of forwards and backwards (ZeRO's collectives need that)."""
        if self.world == 1:
            return rows, torch.ones(len(rows), dtype=torch.bool)
        mine = rows[self.rank :: self.world]
        pad = -(-len(rows) // self.world) - len(mine)
        real = torch.cat([torch.ones(len(mine), dtype=torch.bool), torch.zeros(pad, dtype=torch.bool)])
        return torch.cat([mine, rows[:1].repeat(pad)]), real

    # -- the update -----------------------------------------------------------------------------

    def on_policy(self, n_episodes: int) -> bool:
        """True when this update takes exactly one optimizer step with no critic: π_old = π_θ."""
        cfg = self.cfg
        return self.fast_on_policy and cfg.algo != "ppo" and cfg.epochs == 1 and n_episodes <= cfg.minibatch_size

    def prepare(self, trajs: list[Trajectory], fast: bool) -> Batch:
        """Steps 1 and 2 of an update: the batch of `trajs` with π_old, π_ref, V_old and the TIS
        weights (unless `fast`) and the advantages and value targets on it."""
        cfg = self.cfg
        batch = Batch.from_trajectories(trajs, self.pad_id, routing=cfg.routing_replay)
        if not fast:
            for engine in self.engines:
                engine.eval()
            batch.old_logp, batch.ref_logp, batch.old_values = self.score(batch)
            batch.tis_weights = tis_weight(batch.old_logp, batch.behaviour_logp, cfg.tis_cap)
        batch.advantages, batch.returns = compute_advantages(cfg.algo, batch.rewards, batch.mask, batch.old_values,
                                                             batch.groups, cfg)
        return batch

    def update(self, trajs: list[Trajectory], seed: int = 0) -> dict[str, float]:
        """One RL update on these episodes; infra-error episodes are dropped here. {} if none are left."""
        trajs = [t for t in trajs if not t.infra_error]
        if not trajs:
            return {}
        cfg = self.cfg
        t0 = time.perf_counter()
        e = len(trajs)
        fast = self.on_policy(e)
        batch = self.prepare(trajs, fast)
        for engine in self.engines:
            engine.train()

        sums: dict[str, float] = {}
        steps = 0
        gen = torch.Generator().manual_seed(seed)
        for _ in range(cfg.epochs):
            for minibatch in torch.randperm(e, generator=gen).split(cfg.minibatch_size):
                for k, v in self._optimizer_step(batch, minibatch, fast).items():
                    sums[k] = sums.get(k, 0.0) + v
                steps += 1
        metrics = {k: v / steps for k, v in sums.items()}  # each step's numbers are mini-batch means
        on = batch.mask.bool()
        metrics.update(advantage_by_turn(batch.advantages, batch.mask))
        metrics["zero_var_groups"] = zero_variance_share(batch.rewards.sum(-1), batch.groups)
        if batch.old_values is not None:
            metrics["explained_variance"] = explained_variance(batch.old_values, batch.returns, batch.mask)
        metrics.update({
            "episodes": float(e),
            "adv_mean": float(batch.advantages[on].mean()) if on.any() else 0.0,
            "adv_std": float(batch.advantages[on].std()) if on.sum() > 1 else 0.0,
            "lr": self.engine.get_lr()[0],
            **({"critic_lr": self.critic_engine.get_lr()[0]} if self.critic_engine is not None else {}),
            "old_pass": 0.0 if fast else 1.0,
            "update_s": time.perf_counter() - t0,
            "train_tokens": float(batch.attention_mask.sum()) * cfg.epochs,
        })
        return metrics

    def _optimizer_step(self, batch: Batch, minibatch: torch.Tensor, fast: bool) -> dict[str, float]:
        """One optimizer step (per engine) on the episodes `minibatch`; returns its logged numbers,
        each the mini-batch's weighted mean."""
        weights = loss_weights(batch.mask[minibatch], self.cfg.loss_aggregation)  # sums to 1 over the mini-batch
        mine, real = self._shard(torch.arange(len(minibatch)))
        rows, weights = minibatch[mine], weights[mine] * real[:, None]  # a padding row weighs 0
        order = batch.by_length(rows)  # the gradient is a sum over rows: their grouping only sets the padding
        rows, weights = rows[order], weights[order]
        micro = list(zip(rows.split(self.cfg.micro_batch_size), weights.split(self.cfg.micro_batch_size)))
        sums: dict[str, float] = {}
        for j, (rows, w) in enumerate(micro):
            for engine in self.engines:
                engine.set_gradient_accumulation_boundary(j == len(micro) - 1)
            for k, v in self._micro_step(batch, rows, w, fast).items():
                sums[k] = sums.get(k, 0.0) + v
        norms = {name: grad_norm(engine) for name, engine in (("grad_norm", self.engine),
                                                               ("critic_grad_norm", self.critic_engine))}
        for engine in self.engines:
            engine.step()
        if self.world > 1:  # each rank logged its share of the mini-batch's weighted means
            keys = sorted(sums)
            total = all_reduce_sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64))
            sums = dict(zip(keys, total.tolist()))
        for name, engine in (("grad_norm", self.engine), ("critic_grad_norm", self.critic_engine)):
            norm = norms[name] if norms[name] is not None else (engine.get_global_grad_norm() if engine else None)
            if norm is not None:  # the whole gradient's, before clipping
                sums[name] = float(norm)
        return sums

    def _micro_step(self, batch: Batch, rows: torch.Tensor, weights: torch.Tensor, fast: bool) -> dict[str, float]:
        """Forward and backward of one micro-batch (no optimizer step). `weights` [B, T-1] are these
        rows' loss weights; returns this micro-batch's share of each logged number."""
        cfg, dev = self.cfg, self.device
        ids, am, t = self._rows(batch, rows)
        sl = (rows, slice(0, t - 1))
        w = weights[:, : t - 1].to(dev)
        behaviour_logp = batch.behaviour_logp[sl].to(dev)
        tap = self._router_tap(self.engine, batch, rows, t)
        logp, ent = logprobs_and_entropy(self._logits(self.engine, batch, rows, ids, am, tap), ids[:, 1:],
                                         entropy_grad=cfg.entropy_coef > 0)
        if fast:  # on-policy: π_old is this very forward (ratio 1, gradient of ρ = ∇ log π)
            old_logp = logp.detach()
            tis_w = tis_weight(old_logp, behaviour_logp, cfg.tis_cap)
            ref_logp = self._ref_logp(batch, rows, ids, am) if self.reference is not None else None
        else:
            old_logp, tis_w = batch.old_logp[sl].to(dev), batch.tis_weights[sl].to(dev)
            ref_logp = None if batch.ref_logp is None else batch.ref_logp[sl].to(dev)
        pg_loss, clip_frac = clipped_policy_loss(logp, old_logp, batch.advantages[sl].to(dev), w, cfg.clip_eps, tis_w)
        entropy = weighted_sum(ent, w)
        loss = pg_loss - cfg.entropy_coef * entropy if cfg.entropy_coef > 0 else pg_loss
        with torch.no_grad():
            stats = {"policy_loss": pg_loss, "clip_frac": clip_frac, "entropy": entropy.detach(),
                     "kl_old": weighted_sum(old_logp - logp, w), "tis_weight": weighted_sum(tis_w, w),
                     "logp_gap": weighted_sum((old_logp - behaviour_logp).abs(), w)}
        if ref_logp is not None:
            loss = loss + cfg.kl_coef * kl_loss(logp, old_logp, ref_logp, w, tis_w)
            stats["kl_ref"] = weighted_sum(kl_k3(logp.detach(), ref_logp), w)
        balance = tap.balance_loss(am, self.balance_coef)  # a mixture of experts: over every token routed
        if balance is not None:
            share = w.sum()  # this micro-batch's share of the mini-batch's loss weights
            loss = loss + share * balance[0]
            stats.update(expert_stats(share * balance[0], share * balance[1]))
        aux, aux_stats = auxiliary_losses(self.engine, am)  # other backbones' own losses (mixture of depths)
        if aux is not None:
            share = w.sum()
            loss = loss + share * aux
            stats.update({k: share * v for k, v in aux_stats.items()})
        # The weights already scale each micro-batch; DeepSpeed averages gradients over the ranks,
        # and × world turns that mean back into the mini-batch's sum (the gradient one rank computes).
        self.engine.backward(loss * self.world, scale_wrt_gas=False)
        if self.critic_engine is not None:
            v_loss = clipped_value_loss(self._values(self.critic_engine, ids, am), batch.old_values[sl].to(dev),
                                        batch.returns[sl].to(dev), w, cfg.value_clip)
            self.critic_engine.backward(cfg.vf_coef * v_loss * self.world, scale_wrt_gas=False)
            stats["value_loss"] = v_loss
        return {k: float(v.detach()) for k, v in stats.items()}
