"""Generate TextWorld splits ahead of time, or time generation and play.

    python -m envs.textworld generate --complexity w2-o3-q4 --train-size 100 --heldout-size 50 \
        --workers 2 [--cache-dir data/textworld]
    python -m envs.textworld bench-generate --complexity w2-o3-q4 --games 20 --workers 1 \
        [--first-seed 5000000] [--cache-dir DIR (default: a new temporary folder)]
    python -m envs.textworld bench-play --complexity w2-o3-q4 --episodes 20 [--policy random]

bench-generate uses its own seed range (--first-seed) so the numbers come from fresh games;
bench-play plays the train split with walkthrough or uniformly random admissible commands.
"""

from __future__ import annotations

import argparse
import json
import tempfile

from ..base import TRAIN_SPLIT, VALID_SPLIT, timed_play
from .config import TextWorldConfig
from .env import TextWorldEnv
from .generate import GameCache
from .tasks import HELDOUT, TextWorldTasks


def _config(args, **extra) -> TextWorldConfig:
    return TextWorldConfig(complexity=args.complexity, cache_dir=args.cache_dir, **extra)


def generate(args) -> dict:
    config = _config(args, train_size=args.train_size, heldout_size=args.heldout_size,
                     workers=args.workers)
    source = TextWorldTasks(config)
    sizes = {split: len(source.tasks(split)) for split in (HELDOUT, TRAIN_SPLIT, VALID_SPLIT)}
    return {"folder": str(source.folder), "sizes": sizes, "generated": source.generated,
            "kept": sum(r.kept for r in source.reports),
            "stalled": sum(r.stalled for r in source.reports),
            "failed": sum(r.failed for r in source.reports)}


def bench_generate(args) -> dict:
    if args.cache_dir is None:
        args.cache_dir = tempfile.mkdtemp(prefix="tw_bench_")
    config = _config(args)
    cache = GameCache(config.parsed, config.cache_dir)
    seeds = range(args.first_seed, args.first_seed + args.games)
    report = cache.generate(seeds, workers=args.workers, progress=True, label="bench")
    return {"complexity": report.complexity, "workers": report.workers,
            "generated": report.generated, "seconds": round(report.seconds, 2),
            "games_per_s": round(report.games_per_s, 3), "kept": report.kept,
            "stalled": report.stalled, "failed": report.failed}


def bench_play(args) -> dict:
    config = _config(args, train_size=args.episodes, heldout_size=0,
                     admissible_commands=args.admissible_commands)
    tasks = TextWorldTasks(config).tasks(TRAIN_SPLIT)
    env = TextWorldEnv(config)
    try:
        played = timed_play(env, tasks, follow_walkthrough=args.policy == "walkthrough")
    finally:
        env.close()
    return {"complexity": config.parsed.name, "policy": args.policy, **played}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m envs.textworld", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("generate", "bench-generate", "bench-play"):
        p = sub.add_parser(name)
        p.add_argument("--complexity", default="w2-o3-q4")
        # bench-generate defaults to a fresh temporary cache, so every game is made anew
        p.add_argument("--cache-dir", default=None if name == "bench-generate" else "data/textworld")
        if name == "generate":
            p.add_argument("--train-size", type=int, default=100)
            p.add_argument("--heldout-size", type=int, default=50)
        if name != "bench-play":
            p.add_argument("--workers", type=int, default=1)
        if name == "bench-generate":
            p.add_argument("--games", type=int, default=20)
            p.add_argument("--first-seed", type=int, default=5_000_000)
        if name == "bench-play":
            p.add_argument("--episodes", type=int, default=20)
            p.add_argument("--policy", choices=["walkthrough", "random"], default="random")
            p.add_argument("--admissible-commands", action="store_true")
    args = parser.parse_args(argv)
    run = {"generate": generate, "bench-generate": bench_generate, "bench-play": bench_play}
    print(json.dumps(run[args.command](args)))


if __name__ == "__main__":
    main()
