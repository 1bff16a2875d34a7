#!/usr/bin/env python
"""Turnstile's command line. It only wires: every job lives in algos/recipes.py.

    python launch.py gen-data configs/countdown3_sos.yaml
    python launch.py sft      configs/countdown3_sos.yaml [key=value ...] [--resume]
    python launch.py train    configs/countdown3_grpo.yaml [key=value ...] [--resume]
    python launch.py eval     configs/countdown3_sos.yaml --checkpoint runs/countdown3_sos \
                              [--split S | --problems-file F]

Overrides use dotted keys, e.g. `sft.steps=200 model.hidden_size=256 env.num_inputs=4`.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def _mimalloc_env(environ: dict[str, str]) -> dict[str, str] | None:
    """The environment to re-run this command in with mimalloc preloaded, or None to run as is.

    With glibc's malloc, bf16-autocast CPU training on batches of varying length kept memory it
    had freed: a TextWorld SFT grew ~200 MB a minute (8 GB by the end), a 150-step probe from 0.7
    to 4.3 GB. mimalloc (the `cmeel-mimalloc` wheel, Linux x86-64) reuses it: the probe ends at
    1.7 GB and steps are no slower (docs/textworld.md). Ray's workers inherit the preload.
    `TURNSTILE_MALLOC=system` keeps glibc's malloc."""
    if sys.platform != "linux" or environ.get("TURNSTILE_MALLOC", "mimalloc") != "mimalloc":
        return None
    preload = environ.get("LD_PRELOAD", "")
    if any(lib in preload for lib in ("libmimalloc", "libjemalloc", "libtcmalloc")):
        return None  # the re-run, or the user preloads an allocator of their own (as vLLM-CPU's docs advise)
    try:
        from importlib.metadata import PackageNotFoundError, distribution

        lib = distribution("cmeel-mimalloc").locate_file("cmeel.prefix/lib/libmimalloc.so")
    except PackageNotFoundError:
        return None
    if not os.path.exists(lib):
        return None
    return {**environ, "LD_PRELOAD": f"{lib}:{preload}" if preload else str(lib)}


def _rerun_with_mimalloc() -> None:
    """Replace this process by the same command with mimalloc preloaded, when `_mimalloc_env` says so."""
    env = _mimalloc_env(dict(os.environ))
    if env is not None:
        sys.stdout.flush()
        os.execve(sys.executable, sys.orig_argv, env)  # does not return


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch.py", description="Turnstile: multi-turn RL for language-model agents")
    p.add_argument("--debug", action="store_true", help="show full tracebacks for config and input errors")
    sub = p.add_subparsers(dest="command", required=True)

    def job(name: str, help: str) -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=help)
        s.add_argument("config", help="a YAML recipe, e.g. configs/countdown3_sos.yaml")
        s.add_argument("overrides", nargs="*", help="key=value overrides, e.g. sft.steps=100")
        return s

    job("gen-data", "generate task splits and demonstrations (cached under data_dir)")
    for name, text in (("sft", "SFT on demonstrations, then held-out evaluation"),
                       ("train", "run the recipe: SFT (unless done), then RL with held-out evals before and after")):
        job(name, text).add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    ev = job("eval", "evaluate a checkpoint on a held-out split or a task file")
    ev.add_argument("--checkpoint", required=True, help="a run folder, checkpoint folder or save_pretrained folder")
    ev.add_argument("--split", help="held-out split (default: eval.split)")
    ev.add_argument("--problems-file", help="JSONL tasks to evaluate instead of a split")
    return p


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # a real command line (tests pass argv and stay in their process)
        _rerun_with_mimalloc()
    parser = _parser()
    # key=value overrides may come after options too ("eval cfg.yaml --checkpoint run eval.batch_size=8")
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or "=" not in a]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    import transformers

    transformers.utils.logging.disable_progress_bar()  # per-shard bars; we draw our own
    from algos import recipes
    from algos.checkpoint import CheckpointError
    from algos.config import ConfigError, load_config
    from envs import EnvConfigError

    try:
        exp = load_config(args.config, args.overrides)
        if args.command == "gen-data":
            recipes.gen_data(exp)
        elif args.command == "sft":
            recipes.sft(exp, resume=args.resume)
        elif args.command == "train":
            recipes.train(exp, resume=args.resume)
        elif args.command == "eval":
            recipes.evaluate(exp, args.checkpoint, split=args.split, problems_file=args.problems_file)
    except (ConfigError, CheckpointError, EnvConfigError, FileNotFoundError, ValueError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
