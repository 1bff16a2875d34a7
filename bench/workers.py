"""Rollout scaling: env steps/s of one Ray rollout worker vs two, on the same episodes, in one run.

Each row starts a `RolloutPool` (rollout/worker.py) of N Ray actors, every actor with its own
embedded engine and environments, and plays the same tasks (`--tasks` train tasks x `--group`
episodes each, sampled at temperature 1 with fixed seeds) from the same policy. The machine's
cores are shared out: N workers get `--cores / N` torch threads each. The first play of every
pool is a warm-up and is not counted; then `--rounds` plays are timed from the driver (Ray
scheduling, env steps, generation, and shipping the trajectories back all included).

    python bench/workers.py --policy runs/textworld_w2o3q4_sft          # TextWorld w2-o3-q4
    python bench/workers.py --recipe configs/countdown3_grpo.yaml --policy runs/countdown3_sos
    python bench/workers.py --workers 1 2 4 --cores 4

`--policy` is any trained policy (a run folder or a save_pretrained folder): what it writes
decides how long episodes are, so benchmark the policy you will train from.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def bench(recipe: str, policy: str, workers: list[int], cores: int, tasks_n: int, group: int,
          rounds: int) -> list[dict]:
    import ray

    import envs
    from algos.checkpoint import policy_folder
    from algos.config import load_config
    from rollout.worker import RolloutPool, WorkerSpec

    exp = load_config(recipe)
    source = envs.make_tasks(exp.env.name, **exp.env_options())
    tasks = source.tasks("train")[:tasks_n]
    spec = WorkerSpec(policy_folder=str(policy_folder(policy)), env_name=exp.env.name,
                      env_options=exp.env_options(), max_episode_tokens=exp.model.max_seq_len,
                      precision=exp.runtime.precision)
    rows = []
    for n in workers:
        threads = max(1, cores // n)
        cfg = exp.rollout.model_copy(update={"num_workers": n, "cpus_per_worker": cores / n,
                                             "threads_per_worker": threads})
        pool = RolloutPool(spec, cfg, exp.ray.model_copy(update={"num_cpus": cores}))
        try:
            pool.play(tasks, group, seed=10_000)  # warm-up: engine buffers, env processes
            steps = episodes = tokens = 0
            t0 = time.perf_counter()
            for r in range(rounds):
                trajs, stats = pool.play(tasks, group, seed=r)
                steps += int(stats["turns"])
                episodes += len(trajs)
                tokens += int(stats["policy_tokens"])
            dt = time.perf_counter() - t0
        finally:
            pool.shutdown()
            ray.shutdown()
        rows.append({"workers": n, "threads": threads, "episodes": episodes, "steps": steps,
                     "seconds": dt, "steps_s": steps / dt, "episodes_s": episodes / dt,
                     "policy_tokens_s": tokens / dt})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="configs/textworld_w2o3q4_ppo.yaml")
    ap.add_argument("--policy", required=True, help="policy to play (run folder or save_pretrained folder)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="cores shared by the workers")
    ap.add_argument("--tasks", type=int, default=16)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    rows = bench(args.recipe, args.policy, args.workers, args.cores, args.tasks, args.group, args.rounds)

    from rich.console import Console
    from rich.table import Table

    from rollout.machine import machine_name

    table = Table(title=f"rollout workers: {args.recipe}, {args.tasks} tasks x {args.group} episodes x "
                        f"{args.rounds} rounds, {args.cores} cores; {machine_name()}")
    for col in ("workers", "threads each", "episodes", "env steps", "seconds", "steps/s", "episodes/s",
                "policy tokens/s", "vs 1 worker"):
        table.add_column(col, justify="right")
    base = rows[0]["steps_s"]
    for r in rows:
        table.add_row(str(r["workers"]), str(r["threads"]), str(r["episodes"]), str(r["steps"]),
                      f"{r['seconds']:.1f}", f"{r['steps_s']:.1f}", f"{r['episodes_s']:.2f}",
                      f"{r['policy_tokens_s']:.0f}", f"{r['steps_s'] / base:.2f}x")
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
