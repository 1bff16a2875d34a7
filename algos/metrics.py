"""Run metrics: TensorBoard scalars and one JSON line per logged step (both append on resume)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class MetricsLogger:
    def __init__(self, run_dir: str | Path):
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.tb = SummaryWriter(str(self.run_dir / "tb"))
        self.jsonl = open(self.run_dir / "metrics.jsonl", "a")

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
