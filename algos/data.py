"""Generated data on disk: task splits and SFT demonstrations, cached by what they depend on,
and the held-out tasks that evaluations read from there.

Everything here is generated (no data set is downloaded): the first run writes
`<data_dir>/<env>-<hash>/` and later runs with the same env and demo settings reuse it.
"""
from __future__ import annotations

import hashlib
import json
import os
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
# How often a data step records how far its demonstrations got (the most a kill loses).
PROGRESS_EVERY_S = 5.0


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
    """Write (or reuse) the held-out task splits and the train demonstrations; return the folder.
    A killed run resumes its demonstrations at the task after the last one it wrote."""
    folder = data_folder(exp)
    done = folder / "DONE"
    if done.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tasks = envs.make_tasks(exp.env.name, **exp.env_options())
    for split in tasks.heldout_splits():
        if (folder / f"{split}.jsonl").exists():  # written before the run was killed
            continue
        t0 = time.perf_counter()
        n = _write_jsonl(folder / f"{split}.jsonl", tasks.tasks(split))
        tqdm.write(f"{split}: {n} tasks in {time.perf_counter() - t0:.1f}s")

    n_tasks = exp.sft.demos.num_examples
    partial = DemoProgress(folder / "train_demos.jsonl", every_s=PROGRESS_EVERY_S)
    if partial.tasks:
        tqdm.write(f"resuming the demonstrations at task {partial.tasks} of {n_tasks} "
                   f"({partial.demos} written, {partial.seconds:.0f}s spent)")
    demos = envs.demos_by_task(exp.env.name, tasks, TRAIN_SPLIT, n_tasks, seed=exp.seed, start=partial.tasks,
                               **demo_options(exp))
    bar = tqdm(demos, total=n_tasks, initial=partial.tasks, desc="demonstrations", disable=not progress,
               dynamic_ncols=True)
    partial.write_all(bar)
    n, dt = partial.demos, partial.seconds
    stats = {"demonstrations": n, "seconds": round(dt, 2), "problems_per_s": round(n / dt, 1)}
    env_stats = envs.spec(exp.env.name).demo_stats
    if env_stats is not None:
        stats.update(env_stats(read_jsonl(folder / "train_demos.jsonl")))
    (folder / "stats.json").write_text(json.dumps(stats, indent=2))
    extra = "".join(f"; {k} {v}" for k, v in stats.items() if k not in ("demonstrations", "seconds", "problems_per_s"))
    tqdm.write(f"train demonstrations: {n} of {n_tasks} tasks in {dt:.1f}s ({n / dt:.0f} tasks/s, task generation "
               f"included){extra}")
    done.touch()
    return folder


class DemoProgress:
    """The demonstrations file of a data step being written: `<name>.part` holds the demos so far
    and `<name>.progress.json` how many tasks (kept or dropped) and demos of it are complete and the
    seconds spent, saved at least every `every_s` seconds after the demos are on disk. A rerun
    reads both, cuts the part file back to the recorded demos and goes on from the next task; the
    last entry renames the part file to its real name."""

    def __init__(self, path: Path, every_s: float = 5.0) -> None:
        self.path, self.every_s = path, every_s
        self.part, self.record = path.with_suffix(path.suffix + ".part"), path.with_suffix(".progress.json")
        saved = json.loads(self.record.read_text()) if self.record.exists() and self.part.exists() else {}
        self.tasks, self.demos, self.seconds = saved.get("tasks", 0), saved.get("demos", 0), saved.get("seconds", 0.0)
        keep = []
        if self.demos:
            with open(self.part) as f:
                keep = [line for _, line in zip(range(self.demos), f)]
            if len(keep) < self.demos:
                raise ValueError(f"{self.part}: {len(keep)} demonstrations, but {self.record} records "
                                 f"{self.demos}; delete both to generate them again")
        self.part.write_text("".join(keep))  # drops what was written after the last record

    def _save(self) -> None:
        tmp = self.record.with_suffix(".tmp")
        tmp.write_text(json.dumps({"tasks": self.tasks, "demos": self.demos, "seconds": round(self.seconds, 3)}))
        tmp.replace(self.record)

    def write_all(self, entries) -> None:
        """Append each entry (a demo, or None for a dropped task) and record the progress."""
        t0 = last = time.perf_counter()
        base = self.seconds
        with open(self.part, "a") as f:
            for entry in entries:
                if entry is not None:
                    f.write(json.dumps(entry) + "\n")
                    self.demos += 1
                self.tasks += 1
                now = time.perf_counter()
                if now - last >= self.every_s:
                    f.flush()
                    os.fsync(f.fileno())
                    self.seconds, last = base + now - t0, now
                    self._save()
        self.seconds = base + time.perf_counter() - t0
        self.part.replace(self.path)
        self.record.unlink(missing_ok=True)


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
