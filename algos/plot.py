"""`launch.py plot RUN [RUN ...]`: one PNG of what an RL engineer reads first, per iteration.

    python launch.py plot runs/cooking_dense runs/cooking_sparse --out runs/density.png

Panels: success (valid evals and the held-out test split's before/after points, greedy and
sampled), mean episode reward, approximate KL to π_old, entropy, clip fraction — from each run's
`metrics.jsonl` (train/*, valid/*, eval/* rows, by step = RL iteration). Each run is labelled by
the config keys in which the runs differ (`rl.algo=ppo, reward.density=sparse`), or by its folder
name when there is one run or nothing differs.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

# (panel title, [(metrics key, series label)])
PANELS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("success", (("valid/accuracy", "valid"), ("valid/sampled_accuracy", "valid, sampled"),
                 ("eval/accuracy", "test"), ("eval/sampled_accuracy", "test, sampled"))),
    ("mean episode reward", (("train/mean_return", "train"),)),
    ("KL to π_old", (("train/kl_old", "train"),)),
    ("entropy", (("train/entropy", "train"),)),
    ("clip fraction", (("train/clip_frac", "train"),)),
)
# keys that differ between any two runs without saying what was compared
NOT_LABELS = ("out_dir", "name", "rl.init_from", "data_dir")


def read_metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        raise ValueError(f"{run}: no metrics.jsonl (not a run folder, or the run has not logged yet)")
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill
            continue
    return rows


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key`, the last row winning per step (a resumed run logs a step again)."""
    by_step: dict[int, float] = {}
    for r in rows:
        if key in r and isinstance(r[key], (int, float)):
            by_step[int(r.get("step", 0))] = float(r[key])
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix[:-1]: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}."))
    return out


def run_labels(runs: list[Path]) -> list[str]:
    """Each run's label: the config keys whose values differ among the runs (else its folder name)."""
    configs = []
    for run in runs:
        path = run / "config.yaml"
        configs.append(flat(yaml.safe_load(path.read_text()) or {}) if path.exists() else {})
    keys = sorted({k for c in configs for k in c})
    differing = [k for k in keys if len({json.dumps(c.get(k), sort_keys=True, default=str) for c in configs}) > 1
                 and not any(k == n or k.startswith(n + ".") for n in NOT_LABELS)]
    if len(runs) < 2 or not differing:
        return [run.name for run in runs]
    return [", ".join(f"{k}={c.get(k)}" for k in differing) for c in configs]


def plot_runs(runs: list[str | Path], out: str | Path, title: str | None = None):
    """Write the PNG; returns the matplotlib figure (closed) for inspection."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    runs = [Path(r) for r in runs]
    if not runs:
        raise ValueError("plot: name at least one run folder")
    data = [read_metrics(r) for r in runs]
    labels = run_labels(runs)
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.6), squeeze=False)
    for ax, (panel, keys) in zip(axes[0], PANELS):
        for rows, label, color in zip(data, labels, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 10):
            for (key, what), style in zip(keys, ("-o", "--", "-s", ":")):
                steps, values = series(rows, key)
                if steps:
                    name = label if len(keys) == 1 else f"{label}: {what}"
                    ax.plot(steps, values, style, color=color, label=name, markersize=3)
        ax.set_title(panel)
        ax.set_xlabel("RL iteration")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=6)
    fig.suptitle(title or ", ".join(r.name for r in runs), fontsize=9)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return fig
