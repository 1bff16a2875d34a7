#!/usr/bin/env python
"""Turnstile's command line. It only wires: every job lives in algos/recipes.py.

    python launch.py gen-data configs/countdown3_sos.yaml
    python launch.py sft      configs/countdown3_sos.yaml [key=value ...] [--resume]
    python launch.py train    configs/countdown3_grpo.yaml [key=value ...] [--resume]
    python launch.py eval     configs/countdown3_sos.yaml --checkpoint runs/countdown3_sos \
                              [--split S | --problems-file F]
    python launch.py distill  configs/countdown3_sos.yaml --teacher runs/moe --gather svd --out runs/ones \
                              [--steps N] [--width W] [--baseline runs/dense]
    python launch.py convert  configs/countdown3_sos.yaml --from runs/countdown3_sos --out runs/factor \
                              [--steps N] [model.arch=factor +model.num_experts=8 +model.top_k=4]
    python launch.py sweep    configs/textworld_cooking_dense.yaml reward.density=sparse,dense rl.algo=ppo,grpo
    python launch.py plot     runs/a runs/b [--out runs/ab.png]
    python launch.py show     runs/a [--failed] [--task ID]       # the episodes' conversations

Overrides use dotted keys, e.g. `sft.steps=200 model.hidden_size=256 env.num_inputs=4`.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from algos.malloc import rerun_with_mimalloc  # noqa: E402  (stdlib only: before the heavy imports)


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
    ds = job("distill", "OneS: gather a trained moe policy's experts into a dense llama student, distil it "
             "against the moe on the recipe's demos, evaluate both")
    ds.add_argument("--teacher", required=True, help="a trained model.arch=moe run, checkpoint or policy folder")
    ds.add_argument("--gather", default="svd", help="sum, average, topk or svd (docs/backbones.md; default svd)")
    ds.add_argument("--out", required=True, help="the student's policy folder (save_pretrained + tokenizer)")
    ds.add_argument("--steps", type=int, help="distillation steps (default sft.steps)")
    ds.add_argument("--width", type=int, help="the student's FFN width (default 4 * hidden_size; sum: all neurons)")
    ds.add_argument("--baseline", help="a dense policy of the same budget: report the share of the moe's gain kept")
    cv = job("convert", "FactorLLM: split a trained dense policy's FFNs into model.num_experts experts (default 8, "
             "top 4), train their routers on the recipe's demos, write a factor policy folder")
    cv.add_argument("--from", dest="source", required=True, help="a trained dense run, checkpoint or policy folder")
    cv.add_argument("--out", required=True, help="the factor policy's folder (rl.init_from / sft.init_from)")
    cv.add_argument("--steps", type=int, default=200, help="router training steps (default 200)")
    cv.add_argument("--lm-loss", action="store_true", help="train the routers on the LM loss too (default: the "
                    "PA and balance losses only)")
    sw = sub.add_parser("sweep", help="run a grid of one recipe (key=a,b axes), resumable; one table and plot")
    sw.add_argument("config", help="a YAML recipe")
    sw.add_argument("overrides", nargs="*", help="key=a,b,... (an axis) or key=value (every run)")
    sw.add_argument("--out", help="the sweep folder (default runs/sweep_<recipe name>)")
    sw.add_argument("--ray", action="store_true", help="run the points as Ray tasks (ray.address joins a cluster)")
    sw.add_argument("--cpus-per-run", type=float, default=1.0, help="with --ray: CPUs each point's task holds")
    pl = sub.add_parser("plot", help="a PNG of success, reward, KL, entropy and clip fraction per iteration")
    pl.add_argument("runs", nargs="+", help="run folders (their metrics.jsonl and config.yaml)")
    pl.add_argument("--out", help="the PNG (default: <first run>/plot.png)")
    sh = sub.add_parser("show", help="print evaluated episodes' conversations (an eval file or a run folder)")
    sh.add_argument("results", help="an eval/*.json file, or a run folder (its newest)")
    sh.add_argument("--failed", action="store_true", help="only the episodes not won")
    sh.add_argument("--task", help="one episode: its index or task id")
    sh.add_argument("--limit", type=int, help="at most this many episodes")
    sh.add_argument("--max-chars", type=int, default=2000, help="cut longer texts in the middle (0: never)")
    return p


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # a real command line (tests pass argv and stay in their process)
        rerun_with_mimalloc()
    parser = _parser()
    # key=value overrides may come after options too ("eval cfg.yaml --checkpoint run eval.batch_size=8")
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or "=" not in a]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        if not hasattr(args, "overrides"):
            parser.error(f"{args.command} takes no key=value overrides: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    import transformers

    transformers.utils.logging.disable_progress_bar()  # per-shard bars; we draw our own
    from algos import recipes
    from algos.checkpoint import CheckpointError
    from algos.config import ConfigError, load_config
    from algos.run_folder import STORAGE_ERRNOS, RunFolderError, storage_error
    from envs import EnvConfigError

    try:
        if args.command == "show":
            from algos.show import show

            show(args.results, failed=args.failed, task=args.task, limit=args.limit, max_chars=args.max_chars)
            return 0
        if args.command == "plot":
            from algos.plot import plot_runs

            out = args.out or f"{args.runs[0]}/plot.png"
            plot_runs(args.runs, out)
            print(out)
            return 0
        if args.command == "sweep":
            from algos.sweep import sweep

            sweep(args.config, args.overrides, out_dir=args.out, use_ray=args.ray, cpus_per_run=args.cpus_per_run)
            return 0
        exp = load_config(args.config, args.overrides)
        if args.command == "gen-data":
            recipes.gen_data(exp)
        elif args.command == "sft":
            recipes.sft(exp, resume=args.resume)
        elif args.command == "train":
            recipes.train(exp, resume=args.resume)
        elif args.command == "eval":
            recipes.evaluate(exp, args.checkpoint, split=args.split, problems_file=args.problems_file)
        elif args.command == "distill":
            from algos.distill import distill

            distill(exp, args.teacher, args.out, gather=args.gather, steps=args.steps, width=args.width,
                    baseline=args.baseline)
        elif args.command == "convert":
            from algos.convert import convert_to_factor

            convert_to_factor(exp, args.source, args.out, args.steps, lm_loss=args.lm_loss)
    except (ConfigError, CheckpointError, EnvConfigError, FileNotFoundError, ValueError, RunFolderError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a read-only folder met outside a checkpoint write: what and where
        if args.debug or e.errno not in STORAGE_ERRNOS:
            raise
        print(f"error: {storage_error(e, e.filename or '.', f'running {args.command}')}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
