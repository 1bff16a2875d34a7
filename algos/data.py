"""Generated data on disk: task splits and SFT demonstrations, cached by what they depend on.

Everything here is generated (no data set is downloaded): the first run writes
`<data_dir>/<env>-<hash>/` and later runs with the same env and demo settings reuse it.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from tqdm.auto import tqdm

import envs
from algos.config import Experiment


def _write_jsonl(path: Path, rows) -> int:
    tmp = path.with_suffix(".tmp")
    n = 0
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
            n += 1
    tmp.replace(path)  # a killed run never leaves a half-written file under the real name
    return n


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def data_folder(exp: Experiment) -> Path:
    demos = exp.sft.demos.model_dump()
    if not demos["mistakes"]:  # keys added later stay out at their off value: old caches stay valid
        del demos["mistakes"]
    key = json.dumps({"env": exp.env.model_dump(), "demos": demos}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    return Path(exp.data_dir) / f"{exp.env.name}-{digest}"


def prepare_data(exp: Experiment, progress: bool = True) -> Path:
    """Write (or reuse) the held-out task splits and the train demonstrations; return the folder."""
    folder = data_folder(exp)
    done = folder / "DONE"
    if done.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tasks = envs.make_tasks(exp.env.name, **exp.env_options())
    for split in tasks.heldout_splits():
        t0 = time.perf_counter()
        n = _write_jsonl(folder / f"{split}.jsonl", tasks.tasks(split))
        tqdm.write(f"{split}: {n} tasks in {time.perf_counter() - t0:.1f}s")

    demos_cfg = exp.sft.demos
    t0 = time.perf_counter()
    demos = tasks.demonstrations("train", demos_cfg.num_examples, seed=exp.seed, **demos_cfg.options())
    bar = tqdm(demos, total=demos_cfg.num_examples, desc="demonstrations", disable=not progress, dynamic_ncols=True)
    n = _write_jsonl(folder / "train_demos.jsonl", bar)
    dt = time.perf_counter() - t0
    stats = {"demonstrations": n, "seconds": round(dt, 2), "problems_per_s": round(n / dt, 1)}
    rows = read_jsonl(folder / "train_demos.jsonl")
    if rows and "goal_reached" in rows[0]:
        stats["goal_reached"] = round(sum(r["goal_reached"] for r in rows) / len(rows), 4)
        stats["mean_chars"] = round(sum(len(r["completion"]) for r in rows) / len(rows), 1)
    (folder / "stats.json").write_text(json.dumps(stats, indent=2))
    tqdm.write(f"train demonstrations: {n} in {dt:.1f}s ({n / dt:.0f} problems/s, "
               "problem generation + search included)"
               + (f"; {stats['goal_reached']:.1%} reach the goal" if "goal_reached" in stats else ""))
    done.touch()
    return folder
