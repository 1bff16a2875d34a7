"""Supervised fine-tuning: next-token loss on demonstrations, masked to the part the policy writes.

For Countdown the demonstration is a search stream: the prompt (the problem's first state line)
is context, the stream after it is the target. The loop runs on a DeepSpeed engine (ZeRO stage,
precision and device from `runtime`), checkpoints every `save_every` steps and resumes exactly:
the batch order is a pure function of (seed, step), so a resumed run sees the same batches. A
mixture-of-experts policy (model.arch: moe) adds its load-balance loss (agents/moe.py) and logs
it with the per-expert load.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from agents.model import auxiliary_losses, build_model
from agents.moe import RouterTap, expert_stats, parameter_counts
from algos.checkpoint import latest_checkpoint, load_learner_state, load_policy, save_checkpoint
from algos.config import Experiment
from algos.metrics import MetricsLogger
from algos.runtime import (compile_for_training, init_deepspeed, optimizer_options, param_dtype, resolve_runtime,
                            rng_state, set_rng_state)

IGNORE = -100  # label value the cross-entropy skips


@dataclass
class Example:
    input_ids: list[int]
    loss_mask: list[int]  # 1 where the policy writes the token (it is trained on), 0 on context


class BucketedBatches:
    """Batches of similar-length examples (little padding), in an order fixed by (seed, epoch)."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int, bucket_batches: int = 64):
        if not lengths:
            raise ValueError("no training examples")
        self.lengths = np.asarray(lengths)
        self.batch_size = min(batch_size, len(lengths))
        self.seed = seed
        self.bucket = self.batch_size * bucket_batches
        self.per_epoch = len(lengths) // self.batch_size
        self._epoch, self._batches = -1, []

    def _make_epoch(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.lengths))[: self.per_epoch * self.batch_size]
        batches = []
        for start in range(0, len(order), self.bucket):
            chunk = order[start : start + self.bucket]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def __getitem__(self, k: int) -> np.ndarray:
        epoch, i = divmod(k, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self._make_epoch(epoch)
        return self._batches[i]


def collate(examples: list[Example], pad_id: int, device) -> dict[str, torch.Tensor]:
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attn = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):  # right padding: positions start at 0 for every row
        n = len(e.input_ids)
        t = torch.as_tensor(e.input_ids)
        ids[row, :n] = t
        attn[row, :n] = 1
        labels[row, :n] = torch.where(torch.as_tensor(e.loss_mask, dtype=torch.bool), t, IGNORE)
    return {"input_ids": ids.to(device), "attention_mask": attn.to(device), "labels": labels.to(device)}


def sft_loss(engine, batch: dict[str, torch.Tensor], balance_coef: float) -> tuple[torch.Tensor, dict]:
    """One micro-batch's loss: the masked next-token loss, plus the backbone's auxiliary losses over
    its real tokens (a mixture of experts' balance loss, a mixture of depths' capacity
    regulariser). Returns (loss, their stats: e.g. the balance loss and per-expert load; {} for a
    dense model). Every stat whose name ends in `_loss` is part of the returned loss."""
    with RouterTap(engine) as tap:
        loss = engine(**batch).loss
    stats = {}
    balance = tap.balance_loss(batch["attention_mask"], balance_coef)
    if balance is not None:
        loss = loss + balance[0]
        stats.update(expert_stats(*balance))
    aux, aux_stats = auxiliary_losses(engine, batch["attention_mask"])
    if aux is not None:
        loss = loss + aux
        stats.update(aux_stats)
    return loss, stats


def lr_lambda(warmup: int, total: int, min_ratio: float):
    """Linear warmup then cosine decay to min_ratio * lr."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def train_sft(exp: Experiment, examples: list[Example], tokenizer, run_dir: str | Path,
              resume: bool = False, evaluate=None, progress: bool = True) -> Path:
    """Train a fresh policy (or the one in sft.init_from) on `examples`; return the final checkpoint folder.

    `evaluate(model, step) -> dict` (optional) runs every `sft.eval_every` steps.
    """
    cfg, run_dir = exp.sft, Path(run_dir)
    device = resolve_runtime(exp.runtime)
    torch.manual_seed(exp.seed)
    if cfg.init_from:  # e.g. a converted policy (launch.py convert); `tokenizer` is its own (recipes.build_tokenizer)
        model = load_policy(cfg.init_from)[0]
    else:
        model = build_model(exp.model, len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id,
                            tokenizer.eos_token_id)
    model = model.to(device=device, dtype=param_dtype(exp.runtime.precision))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                                  **optimizer_options(exp.runtime, torch.optim.AdamW))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio))
    engine = init_deepspeed(model, optimizer, scheduler, exp.runtime, cfg.batch_size, cfg.grad_accum, cfg.grad_clip)
    compile_for_training(engine.module, exp.runtime, device)
    batches = BucketedBatches([len(e.input_ids) for e in examples], cfg.batch_size, exp.seed)

    step = 0
    ck = latest_checkpoint(run_dir) if resume else None
    if ck is not None:
        state = load_learner_state(ck, engine)
        step = state["step"]
        set_rng_state(state["rng"])
        tqdm.write(f"resumed from {ck} at step {step}")
    elif resume:
        tqdm.write(f"--resume: no checkpoint under {run_dir}, starting from step 0")

    log = MetricsLogger(run_dir, resume_from=step if resume else None)
    n_params, n_active = parameter_counts(model)
    active = f" ({n_active / 1e6:.2f}M active per token)" if n_active != n_params else ""
    tqdm.write(f"SFT: {n_params / 1e6:.2f}M parameters{active}, {len(examples)} examples, "
               f"{batches.per_epoch} batches/epoch, {cfg.steps} steps on {device}")
    bar = tqdm(total=cfg.steps, initial=step, desc="sft", disable=not progress, dynamic_ncols=True)
    engine.train()
    last = None
    t0, tokens = time.perf_counter(), 0
    try:  # the bar closed before an error line is printed, the log closed whatever happens
        while step < cfg.steps:
            loss_sum, routing = 0.0, {}
            for micro in range(cfg.grad_accum):
                idx = batches[step * cfg.grad_accum + micro]
                batch = collate([examples[i] for i in idx], tokenizer.pad_token_id, engine.device)
                loss, stats = sft_loss(engine, batch, exp.model.balance_coef or 0.0)
                engine.backward(loss)
                engine.step()
                aux = sum(float(v) for k, v in stats.items() if k.endswith("_loss"))  # what sft_loss added
                loss_sum += (loss.item() - aux) / cfg.grad_accum  # the LM loss
                for k, v in stats.items():
                    routing[k] = routing.get(k, 0.0) + float(v) / cfg.grad_accum
                tokens += int(batch["attention_mask"].sum())
            step += 1
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                dt = time.perf_counter() - t0
                metrics = {"loss": loss_sum, "lr": scheduler.get_last_lr()[0], "tokens_per_s": tokens / dt,
                           "epoch": step * cfg.grad_accum / batches.per_epoch, **routing}
                log.log(step, metrics, prefix="sft/")
                bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{tokens / dt:.0f}")
                t0, tokens = time.perf_counter(), 0
            if step % cfg.save_every == 0 or step == cfg.steps:
                last = save_checkpoint(run_dir, step, engine, tokenizer,
                                       {"step": step, "rng": rng_state(), "phase": "sft"}, cfg.keep_checkpoints)
            if evaluate is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                engine.eval()
                log.log(step, evaluate(engine.module, step), prefix="valid/")  # periodic evals read valid
                engine.train()
    finally:
        bar.close()
        log.close()
    return last or latest_checkpoint(run_dir)
