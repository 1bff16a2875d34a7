"""Generate ALFWorld splits ahead of time, or time generation and play.

    python -m envs.alfworld generate --train-size 600 --heldout-size 120 --workers 2 [--cache-dir data/alfworld]
    python -m envs.alfworld bench-generate --games 60 --workers 1 [--time-limit 120] \
        [--cache-dir DIR (default: a new temporary folder)]
    python -m envs.alfworld bench-play --split train --episodes 30 [--policy random|expert] [--density dense]

Every command takes --planner expert|fast_downward (env.planner; default expert). bench-generate
makes the first --games train-split candidates (all task types in turn) in a fresh cache, so its
numbers come from new games; bench-play plays a split with the expert plan or uniformly random
admissible commands and reports env steps/s (with --density dense and a random policy, nearly
every step asks the planner: the cost of dense rewards).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter

from ..base import TRAIN_SPLIT, timed_play
from .config import TASK_TYPES, AlfWorldConfig
from .env import AlfWorldEnv
from .tasks import SPLITS, AlfWorldTasks


def generate(args) -> dict:
    source = AlfWorldTasks(AlfWorldConfig(train_size=args.train_size, heldout_size=args.heldout_size,
                                          workers=args.workers, cache_dir=args.cache_dir, planner=args.planner,
                                          task_types=args.task_types or list(TASK_TYPES)))
    sizes = {split: len(source.tasks(split)) for split in SPLITS}
    return {"folder": str(source.folder), "sizes": sizes, "generated": source.generated,
            "kept": sum(r.kept for r in source.reports), "dropped": sum(r.dropped for r in source.reports)}


def bench_generate(args) -> dict:
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="alfworld_bench_")
    source = AlfWorldTasks(AlfWorldConfig(train_size=args.games, heldout_size=0, workers=args.workers,
                                          cache_dir=cache_dir, progress=True, game_time_limit=args.time_limit,
                                          planner=args.planner))
    start = time.perf_counter()
    source.tasks(TRAIN_SPLIT)
    seconds = time.perf_counter() - start
    reasons = Counter()
    for report in source.reports:
        reasons.update(report.reasons)
    generated, kept = source.generated, sum(r.kept for r in source.reports)
    return {"planner": args.planner, "workers": args.workers, "time_limit_s": args.time_limit, "kept_games": kept,
            "generated": generated,
            "seconds": round(seconds, 1),
            "games_per_s": round(generated / seconds, 3), "kept_per_s": round(kept / seconds, 3),
            "dropped_share": round(1 - kept / max(generated, 1), 4), "drop_reasons": dict(reasons)}


def bench_play(args) -> dict:
    # the games of the expert's cache, whichever planner plays them (the same games, so that the
    # planners' step costs compare)
    config = AlfWorldConfig(train_size=args.episodes, heldout_size=args.episodes, cache_dir=args.cache_dir,
                            reward_density=args.density, max_turns=args.max_turns)
    tasks = AlfWorldTasks(config).tasks(args.split)[: args.episodes]
    env = AlfWorldEnv(config.model_copy(update={"planner": args.planner}))
    try:
        played = timed_play(env, tasks, follow_walkthrough=args.policy == "expert")
    finally:
        env.close()
    return {"split": args.split, "policy": args.policy, "density": args.density, "planner": args.planner, **played}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m envs.alfworld", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("generate", "bench-generate", "bench-play"):
        p = sub.add_parser(name)
        p.add_argument("--cache-dir", default=None if name == "bench-generate" else "data/alfworld")
        p.add_argument("--planner", choices=["expert", "fast_downward"], default="expert")
        if name == "generate":
            p.add_argument("--train-size", type=int, default=600)
            p.add_argument("--heldout-size", type=int, default=120)
            p.add_argument("--task-types", nargs="+", choices=TASK_TYPES, default=None, help="default: all six")
        if name != "bench-play":
            p.add_argument("--workers", type=int, default=1)
        if name == "bench-generate":
            p.add_argument("--games", type=int, default=60)
            p.add_argument("--time-limit", type=float, default=120.0, help="seconds per game (env.game_time_limit)")
        if name == "bench-play":
            p.add_argument("--split", choices=SPLITS, default=TRAIN_SPLIT)
            p.add_argument("--episodes", type=int, default=30)
            p.add_argument("--policy", choices=["expert", "random"], default="random")
            p.add_argument("--density", choices=["sparse", "dense"], default="sparse")
            p.add_argument("--max-turns", type=int, default=50)
    args = parser.parse_args(argv)
    run = {"generate": generate, "bench-generate": bench_generate, "bench-play": bench_play}
    print(json.dumps(run[args.command](args)))


if __name__ == "__main__":
    main()
