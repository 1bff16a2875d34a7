"""Run metrics: TensorBoard scalars and one JSON line per logged step.

Both append. A resumed run continues its logs from the checkpoint's step (`resume_from`): rows
past it were logged by the killed run after its last checkpoint and are logged again by the
resumed one, so they are dropped on open (resuming from step 0 starts a fresh log).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


def _parse(line: str) -> dict | None:
    """A logged row, or None for a blank line or the cut-off last line of a killed write."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) and "step" in row else None


class MetricsLogger:
    def __init__(self, run_dir: str | Path, resume_from: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "metrics.jsonl"
        purge_step = None
        if resume_from is not None:
            rows = path.read_text().splitlines() if path.exists() and resume_from > 0 else []
            kept = [r for r in map(_parse, rows) if r is not None and r["step"] <= resume_from]
            tmp = path.with_suffix(".tmp")  # a kill during this rewrite leaves the old log whole
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, path)
            purge_step = resume_from + 1 if resume_from else 0  # TensorBoard hides old events at steps ≥ this
        self.tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=purge_step)
        self.jsonl = open(path, "a")

    def log(self, step: int, metrics: dict[str, Any], prefix: str = "") -> None:
        row = {"step": step, "time": time.time()}
        for k, v in metrics.items():
            key = f"{prefix}{k}"
            row[key] = v
            if isinstance(v, (int, float)):
                self.tb.add_scalar(key, v, step)
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()

    def close(self) -> None:
        self.tb.close()
        self.jsonl.close()
