"""The RL training loop: collect → advantages → update → sync, with evals and checkpoints.

    for it in iterations:
        tasks  = tasks_per_iter train tasks, drawn from a generator seeded by (seed, it)
        trajs  = rollout workers play group_size episodes of each task        (collect)
        update = learner.update(trajs): infra-error episodes dropped, advantages, optimizer steps
        sync   = new policy weights pushed to every worker                     (sync)
        every eval_every: greedy episodes on valid tasks; every save_every: a checkpoint; at the end the test split

Everything random is seeded by (seed, iteration), so a run killed after iteration k and resumed
from its checkpoint plays and learns exactly what the uninterrupted run would have.

rollout.mode=async overlaps collect with update: iteration i+1..i+s (s = rollout.max_staleness)
are submitted to the workers before the learner updates on iteration i, so they play with the
weights of the updates made so far, and new weights are pushed without waiting (each worker loads
them after the plays already queued on it). Every turn records the policy version that sampled it
(`Trajectory.policy_versions`); an episode older than s updates is dropped and counted
(`train/stale_dropped`), and the learner's truncated importance weights correct for the rest. A
resumed async run is a valid run but not bit-identical to the uninterrupted one (its first
iterations after the resume play newer weights).
"""
from __future__ import annotations

import random
import time
from collections import deque
from pathlib import Path

from tqdm.auto import tqdm

import envs
from algos.checkpoint import latest_checkpoint, policy_folder
from algos.config import Experiment, save_config
from algos.data import heldout_tasks
from algos.evaluate import env_eval_stats, episode_records, print_summary, save_eval, summarize
from algos.metrics import MetricsLogger
from algos.ranks import make_learner
from algos.run_folder import holds_run_folder
from algos.runtime import apply_threads, rng_state, seed_everything, set_rng_state
from rollout.runner import episode_seed
from rollout.trajectory import Trajectory
from rollout.worker import RolloutPool, WorkerSpec


def evaluate_pool(pool: RolloutPool, tasks: list[dict], seed: int, samples: int = 0,
                  temperature: float = 1.0, env_name: str | None = None) -> tuple[dict, list[dict]]:
    """Greedy held-out episodes (summary, records), with the env's own eval statistics when
    `env_name` is given; with `samples`, the summary also holds `sampled_accuracy`: success over
    that many episodes per task at `temperature`."""
    trajs, stats = pool.play(tasks, 1, seed=seed, temperature=0.0)
    summary, records = summarize(trajs, stats), episode_records(trajs)
    if env_name is not None:
        summary.update(env_eval_stats(env_name, records))
    if samples:
        summary["sampled_accuracy"] = sampled_success(pool, tasks, seed, samples, temperature)
    return summary, records


def held_out_line(summary: dict) -> str:
    line = f"success {summary['accuracy']:.1%} on {summary['tasks']} tasks"
    if "sampled_accuracy" in summary:
        line += f" (sampled: {summary['sampled_accuracy']:.1%})"
    return line


def sampled_success(pool: RolloutPool, tasks: list[dict], seed: int, samples: int, temperature: float) -> float:
    trajs, stats = pool.play(tasks, samples, seed=episode_seed(seed, "sampled"), temperature=temperature)
    return summarize(trajs, stats)["accuracy"]


def drop_stale(trajs: list[Trajectory], version: int, max_staleness: int) -> tuple[list[Trajectory], int]:
    """(the episodes whose every turn was sampled by a policy at most `max_staleness` updates older
    than the learner's `version`, how many were dropped). Episodes with no turn are kept."""
    fresh = [t for t in trajs if t.staleness_base is None or version - t.staleness_base <= max_staleness]
    return fresh, len(trajs) - len(fresh)


def informative_groups(trajs: list[Trajectory], want: int, max_refills: int, play_more) -> tuple[list, int]:
    """Dynamic sampling (DAPO): keep only the groups whose episode returns differ — a group that all
    won or all failed has zero advantage under GRPO/RLOO and only dilutes the update — and play
    more tasks (`play_more(round)`) until `want` such groups are in hand or `max_refills` rounds are
    spent. Returns (the kept groups' episodes, at most `want` groups; the refill rounds played)."""
    def spread(batch):
        by_group: dict[int, list[Trajectory]] = {}
        for t in batch:
            if not t.infra_error:
                by_group.setdefault(t.group, []).append(t)
        return [g for g in by_group.values() if len(g) > 1 and len({round(t.episode_return, 9) for t in g}) > 1]

    kept = spread(trajs)
    rounds = 0
    while len(kept) < want and rounds < max_refills:
        rounds += 1
        more = play_more(rounds)
        offset = 1 + max((t.group for g in kept for t in g), default=-1)  # fresh group ids for the new tasks
        for t in more:
            t.group += offset
        kept += spread(more)
    return [t for g in kept[:want] for t in g], rounds


@holds_run_folder
def train_rl(exp: Experiment, init_from: str | Path, resume: bool = False,
             stop_after: int | None = None, before: dict | None = None) -> dict:
    """Run the RL stage of `exp` from the policy in `init_from`; returns the before/after evals.

    stop_after: end after this many iterations of this call (a simulated kill, for tests).
    before: the start policy's held-out summary when the caller already has it (skips that eval).
    """
    cfg = exp.rl
    seed_everything(exp.seed)
    apply_threads(exp.runtime)
    run_dir = Path(exp.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(exp, run_dir / "config.yaml")

    init = policy_folder(init_from)
    learner, tokenizer = make_learner(exp, init)  # one rank in this process, or learner.num_ranks Ray actors
    start, state = 0, {}
    ck = latest_checkpoint(run_dir) if resume else None
    if ck is not None:
        state = learner.load(ck)
        set_rng_state(state["rng"])
        start = state["iteration"]
        tqdm.write(f"resumed from {ck} at iteration {start}")

    spec = WorkerSpec(policy_folder=str(init), env_name=exp.env.name, env_options=exp.env_options(),
                      max_episode_tokens=exp.model.max_seq_len, precision=exp.runtime.precision)
    pool = RolloutPool(spec, exp.rollout, exp.ray)
    log = MetricsLogger(run_dir, resume_from=start if resume else None)
    bar = None
    try:
        if start > 0:
            pool.update_weights(learner.policy_state_dict(), version=start)
        source = envs.make_tasks(exp.env.name, **exp.env_options())
        split, eval_tasks = heldout_tasks(exp, limit=exp.eval.num_tasks)  # the test split: before and after RL
        valid_tasks = heldout_tasks(exp, envs.VALID_SPLIT, limit=cfg.eval_tasks)[1] if cfg.eval_every else []
        held_out = dict(samples=cfg.eval_samples, temperature=exp.rollout.temperature)
        before = state.get("before", before)
        if before is None:
            before, records = evaluate_pool(pool, eval_tasks, seed=episode_seed(exp.seed, "eval", 0),
                                            env_name=exp.env.name, **held_out)
            save_eval(run_dir / "eval" / f"{split}_before_rl.json", before, records,
                      {"checkpoint": str(init), "split": split})
            tqdm.write(f"before RL, {split}: {held_out_line(before)}")
        elif cfg.eval_samples and "sampled_accuracy" not in before:  # the SFT stage's greedy eval
            before = {**before, "sampled_accuracy": sampled_success(
                pool, eval_tasks, episode_seed(exp.seed, "eval", 0), **held_out)}
        if start == 0:
            log.log(0, {k: v for k, v in before.items() if isinstance(v, (int, float))}, prefix="eval/")

        end = cfg.iterations if stop_after is None else min(cfg.iterations, start + stop_after)
        bar = tqdm(range(start, end), desc=f"rl/{cfg.algo}", initial=start, total=cfg.iterations,
                   dynamic_ncols=True)
        last = before

        def submit(i: int, *refill: int):  # iteration i's episodes: tasks and seeds depend on (seed, i) only
            tasks = source.sample_tasks("train", cfg.tasks_per_iter,
                                        random.Random(episode_seed(exp.seed, "tasks", i, *refill)),
                                        skip=exp.sft.demos.num_examples if cfg.skip_sft_tasks else 0)
            return pool.submit(tasks, cfg.group_size, seed=episode_seed(exp.seed, "play", i, *refill))

        # rollout.mode=async: up to max_staleness iterations are played ahead, with the weights of
        # the updates made so far, while the learner updates on the oldest (which has waited longest)
        ahead = max_staleness = exp.rollout.max_staleness if exp.rollout.mode == "async" else 0
        in_flight: deque = deque()
        for it in bar:
            t0 = time.perf_counter()
            if not in_flight:
                in_flight.append(submit(it))
            trajs, stats = pool.collect(in_flight.popleft())
            collect_s = time.perf_counter() - t0
            while len(in_flight) < ahead and it + 1 + len(in_flight) < end:
                in_flight.append(submit(it + 1 + len(in_flight)))
            # the learner holds version `it` (its updates so far); older samples than the bound are dropped
            trajs, stale = drop_stale(trajs, it, max_staleness)
            metrics = summarize(trajs, stats)  # what the policy did: before dynamic sampling's filter
            if cfg.dynamic_sampling:
                trajs, refills = informative_groups(trajs, cfg.tasks_per_iter, cfg.max_refills,
                                                    lambda r, i=it: pool.collect(submit(i, "refill", r))[0])
                metrics.update(refills=float(refills), groups_kept=float(len({t.group for t in trajs})))
            metrics.update(learner.update(trajs, seed=episode_seed(exp.seed, it)))  # drops infra errors
            metrics["stale_dropped"] = float(stale)
            metrics["sync_s"] = pool.update_weights(learner.policy_state_dict(), version=it + 1, wait=not ahead)
            metrics["collect_s"] = collect_s
            metrics["rollout_tokens_per_s"] = metrics["policy_tokens"] / max(collect_s, 1e-9)
            metrics["iteration_s"] = time.perf_counter() - t0
            log.log(it + 1, metrics, prefix="train/")
            bar.set_postfix(reward=f"{metrics['mean_return']:.3f}", success=f"{metrics['accuracy']:.2f}",
                            kl=f"{metrics.get('kl_old', 0):.4f}")

            done = it + 1
            if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.iterations:
                last, records = evaluate_pool(pool, valid_tasks, seed=episode_seed(exp.seed, "eval", done),
                                              env_name=exp.env.name, **held_out)
                save_eval(run_dir / "eval" / f"valid_{done}.json", last, records,
                          {"iteration": done, "split": envs.VALID_SPLIT})
                log.log(done, last, prefix="valid/")
                tqdm.write(f"iteration {done}: valid {held_out_line(last)}")
            if done % cfg.save_every == 0 or done == cfg.iterations:
                learner.save(run_dir, done, tokenizer, {"iteration": done, "rng": rng_state(), "before": before},
                             cfg.keep_checkpoints)
        bar.close()
        if end < cfg.iterations:
            return {"before": before, "stopped_at": end}

        after, records = evaluate_pool(pool, eval_tasks, seed=episode_seed(exp.seed, "eval", cfg.iterations),
                                       env_name=exp.env.name, **held_out)
        log.log(cfg.iterations, after, prefix="eval/")
        save_eval(run_dir / "eval" / f"{split}_rl.json", after, records,
                  {"checkpoint": str(latest_checkpoint(run_dir)), "split": split, "before": before})
        print_summary(f"{exp.name}: test split {split}, before and after {cfg.algo.upper()}",
                      {"before RL": before, "after RL": after})
        return {"before": before, "after": after}
    finally:
        if bar is not None:  # closed before an error line is printed
            bar.close()
        log.close()
        pool.shutdown()
        learner.shutdown()
