"""ALFWorld's own statistics: of the SFT demonstrations, and of an evaluation per task type."""
from __future__ import annotations

from collections import defaultdict

from .config import TASK_TYPES


def demo_stats(demos: list[dict]) -> dict:
    """Share of demos with a detour, mean expert turns, and demos per task type."""
    if not demos:
        return {}
    out = {"detour_share": round(sum(any(not t.get("expert", True) for t in d["turns"]) for d in demos)
                                 / len(demos), 4),
           "mean_turns": round(sum(len(d["turns"]) for d in demos) / len(demos), 2)}
    for task_type in TASK_TYPES:
        n = sum(d["task"].get("task_type") == task_type for d in demos)
        if n:
            out[f"demos/{task_type}"] = n
    return out


def eval_stats(records: list[dict]) -> dict:
    """Success and episode count per task type (the paper's table): `success/<type>`, `tasks/<type>`.
    Infra-error episodes are not scored."""
    wins, counts = defaultdict(int), defaultdict(int)
    for r in records:
        if r.get("infra_error"):
            continue
        task_type = (r.get("task") or {}).get("task_type") or "unknown"
        counts[task_type] += 1
        wins[task_type] += bool(r["won"])
    out: dict = {}
    for task_type in sorted(counts, key=lambda t: TASK_TYPES.index(t) if t in TASK_TYPES else len(TASK_TYPES)):
        out[f"success/{task_type}"] = wins[task_type] / counts[task_type]
        out[f"tasks/{task_type}"] = counts[task_type]
    return out
