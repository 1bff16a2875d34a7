"""Backbones side by side on the main job: SFT then RL on multi-turn 3-number Countdown, for the
dense policy and each sparse arch, with the same recipe, budget and seed.

Each arch is the main job's recipe (configs/countdown3_grpo.yaml by default) with `model.arch`
(and `--set` overrides) changed, run into `<out>/<arch>/` (its SFT stage in `<out>/<arch>/sft`):
held-out success on the test split (eval.split) greedy and sampled, before RL (the SFT policy)
and after, parameters (total and active per token), SFT learner tokens/s and RL rollout tokens/s
(from the runs' own metrics). `factor` is not trained from scratch: it is the trained dense SFT
policy converted (`launch.py convert`, router training only), then RL'd like the others.

Every run resumes (`--resume` semantics): kill this script and start it again and it continues
where it stopped; finished archs are read back from their folders. The table goes to stdout and
`<out>/backbones.json`.

    python bench/backbones.py                                   # all archs, the recipe's budget
    python bench/backbones.py --archs llama moe --set rl.iterations=10
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ARCHS = ["llama", "moe", "mod", "routed_attention", "monarch", "factor"]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _last(metrics_file: Path, key: str) -> float | None:
    """The mean of `key` over a run's metrics.jsonl rows that have it (None if none do)."""
    if not metrics_file.exists():
        return None
    vals = []
    for line in metrics_file.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if key in row:
            vals.append(float(row[key]))
    return sum(vals) / len(vals) if vals else None


def run_arch(arch: str, recipe: str, out: Path, sets: list[str], convert_steps: int) -> dict:
    import torch

    from agents.model import load_pretrained
    from algos.config import load_config
    from algos.recipes import train

    run = out / arch
    sft_dir = run / "sft"
    overrides = [f"out_dir={run}", f"rl.init_from={sft_dir}", *sets]
    if arch != "llama":
        overrides.insert(0, f"model.arch={arch}")
    if arch == "factor":  # the dense SFT policy, converted: routers trained, everything else kept
        from algos.convert import convert_to_factor

        dense = load_config(recipe, [f"out_dir={out / 'llama'}", f"rl.init_from={out / 'llama' / 'sft'}", *sets])
        if not (out / "llama" / "sft" / "checkpoints").is_dir():
            raise SystemExit("factor converts the dense SFT policy: run the llama arch first")
        if not (sft_dir / "config.json").exists():
            convert_to_factor(dense, out / "llama" / "sft", sft_dir, steps=convert_steps)
        overrides = [f"out_dir={run}", f"rl.init_from={sft_dir}", *sets]
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
    row["sft_tokens_per_s"] = _last(sft_dir / "metrics.jsonl", "train/tokens_per_s")
    row["rollout_tokens_per_s"] = _last(run / "metrics.jsonl", "train/rollout_tokens_per_s")
    row["learner_update_s"] = _last(run / "metrics.jsonl", "train/update_s")
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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="configs/countdown3_grpo.yaml")
    ap.add_argument("--archs", nargs="+", default=ARCHS, choices=ARCHS)
    ap.add_argument("--out", default="runs/backbones")
    ap.add_argument("--set", dest="sets", nargs="*", default=[], help="key=value overrides for every arch")
    ap.add_argument("--convert-steps", type=int, default=200, help="factor: router-training steps")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = out / "backbones.json"
    rows = json.loads(table.read_text()) if table.exists() else {}
    for arch in args.archs:
        rows[arch] = run_arch(arch, args.recipe, out, args.sets, args.convert_steps)
        table.write_text(json.dumps(rows, indent=2))
    print(f"\n{args.recipe} per arch ({cpu_name()}; test split, {rows[args.archs[0]].get('tasks')} tasks, one seed)\n")
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
