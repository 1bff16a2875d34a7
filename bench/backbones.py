"""Backbones side by side on the main job: SFT then RL on multi-turn 3-number Countdown, for the
dense policy and each sparse arch, with the same recipe, budget and seed.

Each arch is the main job's recipe (configs/countdown3_grpo.yaml by default) with `model.arch`
(and `--set` overrides) changed, run into `<out>/<arch>/` (its SFT stage in `<out>/<arch>/sft`):
held-out success on the test split (eval.split) greedy and sampled, before RL (the SFT policy)
and after, parameters (total and active per token), SFT learner tokens/s and RL rollout tokens/s
(from the runs' own metrics). `factor` and `ones` are not trained from scratch: `factor` is the
trained dense SFT policy converted (`launch.py convert`, router training only), `ones` the
trained `moe` SFT policy gathered into a dense student (SVD) and distilled against it
(`launch.py distill`, `--distill-steps`); both are then RL'd like the others.

Every run resumes (`--resume` semantics): kill this script and start it again and it continues
where it stopped; archs finished before are read back from `backbones.json` (`--rerun` redoes them). The table goes to stdout and
`<out>/backbones.json`.

    python bench/backbones.py                                   # all archs, the recipe's budget
    python bench/backbones.py --archs llama moe --set rl.iterations=10
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ARCHS = ["llama", "moe", "mod", "routed_attention", "monarch", "factor", "ones"]
# not trained from scratch: made from another arch's trained SFT policy (which must be run first)
DERIVED = {"factor": "llama", "ones": "moe"}


def _median(metrics_file: Path, key: str) -> float | None:
    """The median of `key` over a run's metrics.jsonl rows that have it (None if none do): a
    shared machine slows some windows, the median reads the rest."""
    from algos.plot import read_metrics

    if not metrics_file.exists():
        return None
    vals = [float(row[key]) for row in read_metrics(metrics_file.parent) if key in row]
    return statistics.median(vals) if vals else None


def run_arch(arch: str, recipe: str, out: Path, sets: list[str], convert_steps: int,
             distill_steps: int) -> dict:
    import torch

    from agents.model import load_pretrained
    from algos.config import load_config
    from algos.recipes import train

    run = out / arch
    sft_dir = run / "sft"
    overrides = [f"out_dir={run}", f"rl.init_from={sft_dir}", *sets]
    if arch not in ("llama", "ones"):
        overrides.insert(0, f"model.arch={arch}")
    if arch in DERIVED:
        source = out / DERIVED[arch] / "sft"
        if not (source / "checkpoints").is_dir():
            raise SystemExit(f"{arch} is made from the {DERIVED[arch]} SFT policy: run the {DERIVED[arch]} arch first")
        src_exp = load_config(recipe, [*([f"model.arch={DERIVED[arch]}"] if DERIVED[arch] != "llama" else []),
                                       f"out_dir={out / DERIVED[arch]}", f"rl.init_from={source}", *sets])
        if not (sft_dir / "config.json").exists():
            if arch == "factor":  # the dense SFT policy, converted: routers trained, everything else kept
                from algos.convert import convert_to_factor

                convert_to_factor(src_exp, source, sft_dir, steps=convert_steps)
            else:  # OneS: the moe SFT policy gathered (SVD) into a dense student, distilled against it
                from algos.distill import distill_to_dense

                dense_exp = load_config(recipe, [f"out_dir={run}", f"rl.init_from={sft_dir}", *sets])
                distill_to_dense(dense_exp, source, sft_dir, gather="svd", steps=distill_steps)
    exp = load_config(recipe, overrides)
    t0 = time.perf_counter()
    result = train(exp, resume=True)
    row = {"arch": arch, "wall_s": time.perf_counter() - t0}
    for stage in ("before", "after"):
        s = result.get(stage) or {}
        row[f"{stage}_greedy"] = s.get("accuracy")
        row[f"{stage}_sampled"] = s.get("sampled_accuracy")
        row["tasks"] = s.get("tasks", row.get("tasks"))
    folder = sft_dir if (sft_dir / "config.json").exists() else None
    if folder is None:
        from algos.checkpoint import policy_folder

        folder = policy_folder(sft_dir)
    model, _ = load_pretrained(folder)
    total = sum(p.numel() for p in model.parameters())
    row["params"] = total
    row["active_params"] = _active(arch, model, total)
    row["sft_tokens_per_s"] = _median(sft_dir / "metrics.jsonl", "sft/tokens_per_s")
    row["rollout_tokens_per_s"] = _median(run / "metrics.jsonl", "train/rollout_tokens_per_s")
    row["learner_update_s"] = _median(run / "metrics.jsonl", "train/update_s")
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return row


def _active(arch: str, model, total: int) -> int:
    """Parameters a token runs through (the arch's own count where it has one)."""
    if arch == "moe":
        from agents.moe import parameter_counts

        return parameter_counts(model)[1]
    if arch == "factor":
        from agents.factor import parameter_counts

        return parameter_counts(model)[1]
    return total  # mod's active share depends on the routing rate: docs/backbones.md


def main(argv=None) -> int:
    from algos.malloc import rerun_with_mimalloc

    rerun_with_mimalloc()  # as launch.py: glibc's malloc grows bf16 CPU training by gigabytes
    from rollout.machine import machine_name
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="configs/countdown3_grpo.yaml")
    ap.add_argument("--archs", nargs="+", default=ARCHS, choices=ARCHS)
    ap.add_argument("--out", default="runs/backbones")
    ap.add_argument("--set", dest="sets", nargs="*", default=[], help="key=value overrides for every arch")
    ap.add_argument("--convert-steps", type=int, default=200, help="factor: router-training steps")
    ap.add_argument("--distill-steps", type=int, default=1000, help="ones: distillation steps")
    ap.add_argument("--rerun", action="store_true", help="run archs already in backbones.json again (their "
                    "runs resume: only the evaluations are redone)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = out / "backbones.json"
    rows = json.loads(table.read_text()) if table.exists() else {}
    for arch in args.archs:
        if rows.get(arch, {}).get("after_greedy") is not None and not args.rerun:
            print(f"{arch}: finished before (in {table}); --rerun evaluates it again")
            continue
        rows[arch] = run_arch(arch, args.recipe, out, args.sets, args.convert_steps, args.distill_steps)
        table.write_text(json.dumps(rows, indent=2))
    print(f"\n{args.recipe} per arch ({machine_name()}; test split, {rows[args.archs[0]].get('tasks')} tasks, one seed)\n")
    print("| arch | params | active | SFT greedy | SFT sampled | RL greedy | RL sampled | SFT tok/s | rollout tok/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")

    def pct(v):
        return "—" if v is None else f"{100 * v:.1f}%"

    def num(v):
        return "—" if v is None else f"{v:,.0f}"

    for arch in args.archs:
        r = rows[arch]
        print(f"| {arch} | {num(r['params'])} | {num(r['active_params'])} | {pct(r['before_greedy'])} | "
              f"{pct(r['before_sampled'])} | {pct(r['after_greedy'])} | {pct(r['after_sampled'])} | "
              f"{num(r['sft_tokens_per_s'])} | {num(r['rollout_tokens_per_s'])} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
