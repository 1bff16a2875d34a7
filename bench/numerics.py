"""Which numbers a run's result depends on: the main job shrunk, once per precision, fingerprinted.

Every run here is seeded, so on one machine a rerun prints the same table. Across CPUs it need not:
oneDNN picks other kernels (AMX tiles, AVX512-BF16, AVX2 emulation) with other summation orders,
and under bf16 autocast a different rounding of one matmul moves a sampled token, after which the
episode, the update and every later number differ. This bench makes that visible: it runs the main
job's recipe (SFT then GRPO) at a small budget once per `--precisions` entry into `<out>/<precision>`
and prints, beside the machine it ran on, held-out success before and after RL and a fingerprint
(sha256, first 12 hex digits) of the SFT and the RL policies' weights. Run it on two machines and
compare the fingerprints row by row (docs/countdown.md keeps the ones measured).

    python bench/numerics.py                                   # fp32 and amp_bf16 (~4 minutes on 2 cores)
    python bench/numerics.py --precisions fp32 --set sft.steps=600

Each row resumes (a finished row is read back from its folder; `--rerun` redoes it).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# the main job at a few minutes' budget: enough SFT for the policy to win some episodes (so RL has
# rewards that differ), two GRPO updates, held-out evals on a quarter of the test split
SMALL = ["sft.steps=400", "sft.save_every=400", "sft.log_every=100", "sft.demos.num_examples=2000",
         "eval.num_tasks=64", "rl.iterations=2", "rl.save_every=2", "rl.eval_tasks=64", "rl.eval_samples=1"]


def fingerprint(run_dir: Path) -> str:
    """sha256 of the newest checkpoint's policy weights (first 12 hex digits)."""
    from algos.checkpoint import latest_checkpoint

    ck = latest_checkpoint(run_dir)
    return hashlib.sha256((ck / "model" / "model.safetensors").read_bytes()).hexdigest()[:12]


def run_row(recipe: str, precision: str, out: Path, extra: list[str], rerun: bool) -> dict:
    from algos import recipes
    from algos.config import load_config

    folder = out / precision
    saved = folder / "numerics.json"
    if saved.exists() and not rerun:
        return json.loads(saved.read_text())
    exp = load_config(recipe, [*SMALL, *extra, f"runtime.precision={precision}", f"out_dir={folder}",
                               f"rl.init_from={folder / 'sft'}"])
    result = recipes.train(exp, resume=True)
    row = {"precision": precision, "resolved": exp.runtime.precision,
           "before": result["before"]["accuracy"], "before_sampled": result["before"].get("sampled_accuracy"),
           "after": result["after"]["accuracy"], "after_sampled": result["after"].get("sampled_accuracy"),
           "sft_weights": fingerprint(folder / "sft"), "rl_weights": fingerprint(folder)}
    saved.write_text(json.dumps(row))
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="configs/countdown3_grpo.yaml")
    p.add_argument("--precisions", nargs="+", default=["fp32", "amp_bf16"])
    p.add_argument("--set", nargs="*", default=[], help="more key=value overrides for every row")
    p.add_argument("--out", default="runs/bench_numerics")
    p.add_argument("--rerun", action="store_true", help="redo rows already in --out")
    args = p.parse_args()
    from rollout.machine import machine_name

    out = Path(args.out)
    rows = [run_row(args.recipe, prec, out, args.set, args.rerun) for prec in args.precisions]

    def pct(x):
        return "—" if x is None else f"{x:.1%}"

    print(f"\n{args.recipe} at a small budget ({' '.join(SMALL + args.set)}); machine: {machine_name()}\n")
    print("| precision | resolved | before greedy | before sampled | after greedy | after sampled | SFT weights | RL weights |")
    print("|---|---|---:|---:|---:|---:|---|---|")
    for r in rows:
        print(f"| {r['precision']} | {r['resolved']} | {pct(r['before'])} | {pct(r['before_sampled'])} | "
              f"{pct(r['after'])} | {pct(r['after_sampled'])} | {r['sft_weights']} | {r['rl_weights']} |")


if __name__ == "__main__":
    main()
