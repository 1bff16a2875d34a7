"""Countdown's own statistics: of the SFT demonstrations, and of an evaluation's records."""
from __future__ import annotations

import re
from collections import Counter


def demo_stats(demos: list[dict]) -> dict:
    """How many demo streams reach the goal (a random search may not) and their mean length."""
    if not demos:
        return {}
    return {"goal_reached": round(sum(d["goal_reached"] for d in demos) / len(demos), 4),
            "mean_chars": round(sum(len(d["completion"]) for d in demos) / len(demos), 1)}


def failure_kind(reason: str) -> str:
    """A verdict's reason without its particulars: "operation N: wrong arithmetic", ..."""
    kind = re.sub(r"'[^']*\d[^']*'", "", reason)  # quoted model text (it holds numbers)
    kind = re.sub(r"\d+", "N", re.sub(r"\[[^\]]*\]", "[…]", kind))
    parts = re.split(r": (?=(?:[^']*'[^']*')*[^']*$)", kind)  # ': ' outside quotes
    return re.sub(r"\s+", " ", ": ".join(parts[:2])).strip() or "unknown"


def eval_stats(records: list[dict]) -> dict:
    """The five commonest kinds of failure among single-turn records (the verifier's reasons)."""
    failures = Counter(failure_kind(r.get("reason", "")) for r in records if not r["won"])
    return {"top_failures": dict(failures.most_common(5))}
