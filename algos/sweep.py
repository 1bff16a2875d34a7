"""`launch.py sweep RECIPE key=a,b key2=c,d`: a grid of runs of one recipe, one comparison table.

    python launch.py sweep configs/textworld_cooking_dense.yaml reward.density=sparse,dense rl.algo=ppo,grpo,rloo
    python launch.py sweep configs/countdown3_grpo.yaml rl.lr=3e-5,1e-4 seed=0,1,2 --ray   # Ray tasks on a cluster

A `key=a,b,...` argument is an axis of the grid; `key=value` (no comma, or a bracketed list) is
the same override for every run. Every point's config is validated before any run starts (a bad
key or value is named then). Each point runs the recipe (`launch.py train`: SFT unless its
policy exists — points that share the SFT keys share its `rl.init_from` — then RL) in its own
folder `<sweep dir>/<key=value,...>/` (default sweep dir: `runs/sweep_<recipe name>/`, or
`--out`). A finished point leaves `sweep_result.json` and is never rerun; a point killed midway
resumes from its last checkpoint (`--resume` semantics), so a killed sweep started again goes
on where it stopped. The sweep dir gets `sweep.md` (the table), `sweep.json` and `sweep.png`
(algos/plot.py over all points). Tune on `valid` (its last eval is a column); the test split's
before/after columns are for the final report.

`--ray`: each point is a Ray task (`ray.address` joins a cluster; one CPU per task unless
`--cpus-per-run`), the points running side by side; each task's rollout workers and learner ranks
are placed as the recipe says, in the same cluster.
"""
from __future__ import annotations

import itertools
import json
import re
import time
from pathlib import Path
from typing import Any

RESULT_FILE = "sweep_result.json"


def parse_grid(items: list[str]) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """(axes [(key, values)], fixed overrides) from `key=a,b` / `key=v` arguments."""
    axes, fixed = [], []
    for item in items:
        if "=" not in item:
            raise ValueError(f"sweep: {item!r} is not key=value or key=a,b,...")
        key, value = item.split("=", 1)
        if "," in value and not value.lstrip().startswith(("[", "{")):
            values = [v.strip() for v in value.split(",")]
            if any(not v for v in values) or len(set(values)) != len(values):
                raise ValueError(f"sweep: axis {key!r} has an empty or repeated value: {value!r}")
            if key in [k for k, _ in axes]:
                raise ValueError(f"sweep: axis {key!r} given twice")
            axes.append((key, values))
        else:
            fixed.append(item)
    if not axes:
        raise ValueError("sweep: no axis (give at least one key=a,b)")
    return axes, fixed


def point_name(point: list[tuple[str, str]]) -> str:
    """The folder of a grid point: its key=value pairs, safe as one path component."""
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", ",".join(f"{k}={v}" for k, v in point))


def _numbers(summary: dict | None) -> dict[str, float]:
    return {k: v for k, v in (summary or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _last_valid(run: Path) -> dict[str, float]:
    from algos.plot import read_metrics, series

    out = {}
    rows = read_metrics(run) if (run / "metrics.jsonl").exists() else []
    for key in ("valid/accuracy", "valid/sampled_accuracy"):
        steps, values = series(rows, key)
        if steps:
            out[key] = values[-1]
    return out


def run_point(recipe: str, overrides: list[str]) -> dict:
    """One grid point, end to end (resumable); its result dict, also written to RESULT_FILE."""
    from algos import recipes
    from algos.config import load_config

    exp = load_config(recipe, overrides)
    run = Path(exp.out_dir)
    t0 = time.perf_counter()
    result = recipes.train(exp, resume=True)
    if exp.rl is None:  # an SFT recipe: its held-out summary
        result = {"after": result}
    out = {"before": _numbers(result.get("before")), "after": _numbers(result.get("after")),
           **_last_valid(run), "wall_s": round(time.perf_counter() - t0, 1)}
    (run / RESULT_FILE).write_text(json.dumps(out, indent=1))
    return out


def table(axes: list[tuple[str, list[str]]], rows: list[dict]) -> str:
    """The markdown comparison table: one row per point."""
    def pct(v):
        return "—" if v is None else f"{100 * v:.1f}%"

    cols = ["valid", "test before", "test after", "test before, sampled", "test after, sampled", "wall s"]
    lines = ["| " + " | ".join([k for k, _ in axes] + cols) + " |",
             "|" + "---|" * len(axes) + "---:|" * len(cols)]
    for r in rows:
        res = r["result"]
        cells = [r["point"][k] for k, _ in axes] + [
            pct(res.get("valid/accuracy")), pct(res["before"].get("accuracy")), pct(res["after"].get("accuracy")),
            pct(res["before"].get("sampled_accuracy")), pct(res["after"].get("sampled_accuracy")),
            f"{res.get('wall_s', 0):.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def sweep(recipe: str, items: list[str], out_dir: str | Path | None = None, use_ray: bool = False,
          cpus_per_run: float = 1.0) -> dict[str, Any]:
    """Run (or finish) the grid; write sweep.md, sweep.json, sweep.png; return the table's data."""
    from algos.config import load_config

    axes, fixed = parse_grid(items)
    base = load_config(recipe, fixed)
    root = Path(out_dir) if out_dir else Path(base.out_dir).parent / f"sweep_{base.name}"
    points = [list(zip([k for k, _ in axes], values)) for values in itertools.product(*[v for _, v in axes])]
    plan = []
    for point in points:  # every point validated before any work
        overrides = [*fixed, *(f"{k}={v}" for k, v in point), f"out_dir={root / point_name(point)}"]
        load_config(recipe, overrides)
        plan.append((point, overrides, root / point_name(point)))
    root.mkdir(parents=True, exist_ok=True)
    todo = [(point, overrides, run) for point, overrides, run in plan if not (run / RESULT_FILE).exists()]
    print(f"sweep {recipe}: {len(plan)} runs in {root} ({len(plan) - len(todo)} finished before)")
    if use_ray and todo:
        import ray

        from rollout.worker import init_ray

        init_ray(base.ray)
        task = ray.remote(num_cpus=cpus_per_run)(run_point)
        ray.get([task.remote(recipe, overrides) for _, overrides, _ in todo])
    else:
        for point, overrides, run in todo:
            print(f"sweep: {point_name(point)}")
            run_point(recipe, overrides)
    rows = [{"point": dict(point), "run": str(run), "result": json.loads((run / RESULT_FILE).read_text())}
            for point, _, run in plan]
    md = table(axes, rows)
    (root / "sweep.md").write_text(f"`launch.py sweep {recipe} {' '.join(items)}`\n\n{md}")
    (root / "sweep.json").write_text(json.dumps({"recipe": recipe, "items": items, "rows": rows}, indent=1))
    from algos.plot import plot_runs

    plot_runs([run for _, _, run in plan], root / "sweep.png", title=f"sweep of {recipe}")
    print(md)
    return {"root": root, "rows": rows, "table": md}
