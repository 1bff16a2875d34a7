"""Generated data on disk: task splits and SFT demonstrations, cached by what they depend on,
and the held-out tasks that evaluations read from there.

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
from envs import TRAIN_SPLIT


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


# Bumped when the splits a config gives change content. 2: the valid split (Countdown's train
# and heldout_seen no longer draw the valid targets).
SPLITS_VERSION = 2


def demo_options(exp: Experiment) -> dict:
    """The recipe's options of the env's demonstration builder, checked by the env's schema."""
    envs.validate_demo_options(exp.env.name, exp.sft.demos.options())
    return exp.sft.demos.options()


def data_folder(exp: Experiment) -> Path:
    """<data_dir>/<env>-<hash of the env section, the demo options and SPLITS_VERSION>."""
    demos = {"num_examples": exp.sft.demos.num_examples,
             **envs.validate_demo_options(exp.env.name, exp.sft.demos.options()).model_dump()}
    key = {"env": exp.env.model_dump(), "demos": demos, "splits": SPLITS_VERSION}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
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

    n_demos, t0 = exp.sft.demos.num_examples, time.perf_counter()
    demos = envs.demonstrations(exp.env.name, tasks, TRAIN_SPLIT, n_demos, seed=exp.seed, **demo_options(exp))
    bar = tqdm(demos, total=n_demos, desc="demonstrations", disable=not progress, dynamic_ncols=True)
    n = _write_jsonl(folder / "train_demos.jsonl", bar)
    dt = time.perf_counter() - t0
    stats = {"demonstrations": n, "seconds": round(dt, 2), "problems_per_s": round(n / dt, 1)}
    env_stats = envs.spec(exp.env.name).demo_stats
    if env_stats is not None:
        stats.update(env_stats(read_jsonl(folder / "train_demos.jsonl")))
    (folder / "stats.json").write_text(json.dumps(stats, indent=2))
    extra = "".join(f"; {k} {v}" for k, v in stats.items() if k not in ("demonstrations", "seconds", "problems_per_s"))
    tqdm.write(f"train demonstrations: {n} in {dt:.1f}s ({n / dt:.0f} tasks/s, task generation included){extra}")
    done.touch()
    return folder


def heldout_tasks(exp: Experiment, split: str | None = None, problems_file: str | None = None,
                  limit: int | None = None) -> tuple[str, list[dict]]:
    """(name, tasks) of a held-out split (default eval.split, the test split; `valid` for periodic
    evals and tuning), from the data cache when there, or of a user's task file."""
    source = envs.make_tasks(exp.env.name, **exp.env_options())
    if problems_file:
        tasks, name = source.tasks_from_file(problems_file), Path(problems_file).name
    else:
        name = split or exp.eval.split
        if name not in source.heldout_splits():
            raise ValueError(f"unknown held-out split '{name}' of env '{exp.env.name}'; choose from "
                             f"{source.heldout_splits()}")
        cached = data_folder(exp) / f"{name}.jsonl"
        tasks = read_jsonl(cached) if cached.exists() else source.tasks(name)
    return name, tasks[:limit] if limit else tasks
