"""Countdown problems: config, generation, train / held-out splits, and user files.

As in the Stream of Search paper: target values run min_target..max_target and a seeded 10% of
them are held out ("unseen targets"); a problem picks a target, then draws input numbers
uniformly until an exhaustive search finds a solution, so every generated problem is solvable.
A second seeded 10% of the targets is held out for the valid split, so that tuning reads unseen
targets without reading the test split's.

Splits (all deterministic in the config; the first n problems of a split do not depend on how
many are asked for):
  train           seen targets; never contains a heldout_seen problem (duplicates within train
                  are possible, as in the paper)
  valid           valid targets only (neither seen nor unseen), distinct problems: what periodic
                  evals and tuning read (absent if no target is left for it)
  heldout_seen    seen targets, distinct problems, none of them in train
  heldout_unseen  unseen targets only, distinct problems (absent if no target is held out); the
                  same targets and problems as before the valid split existed
Two problems are the same problem when they have the same target and the same multiset of
numbers (Problem.key).
"""

from __future__ import annotations

import json
import math
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from pydantic import Field, model_validator

from ..base import TRAIN_SPLIT, VALID_SPLIT, BaseEnvConfig, TaskSource
from .search import can_reach, solve

MIN_INPUTS, MAX_INPUTS = 2, 6
HELDOUT_SEEN, HELDOUT_UNSEEN = "heldout_seen", "heldout_unseen"
# Give up (with a clear error) rather than loop forever on a config whose problems are too few.
MAX_DRAWS = 10_000


class CountdownConfig(BaseEnvConfig):
    """Config of the single-turn Countdown stream env and of the Countdown task splits."""

    num_inputs: int = Field(4, ge=MIN_INPUTS, le=MAX_INPUTS, description="input numbers")
    min_number: int = Field(1, ge=1, description="smallest input number")
    max_number: int = Field(99, ge=1, description="largest input number")
    min_target: int = Field(10, ge=1, description="smallest target")
    max_target: int = Field(100, ge=1, description="largest target")
    unseen_target_frac: float = Field(
        0.1, ge=0.0, lt=1.0, description="fraction of target values held out of train for the "
        "heldout_unseen (test) split"
    )
    valid_target_frac: float = Field(
        0.1, ge=0.0, lt=1.0, description="fraction of target values held out of train and of every test "
        "split for the valid split"
    )
    train_size: int = Field(100_000, ge=0, description="problems in the train split")
    heldout_size: int = Field(1000, ge=0, description="problems in each test split (heldout_seen, heldout_unseen)")
    valid_size: int | None = Field(None, ge=0, description="problems in the valid split; None = heldout_size")
    seed: int = Field(0, description="seed of the target split and of every problem draw")

    @model_validator(mode="after")
    def _check_ranges(self) -> "CountdownConfig":
        if self.min_number > self.max_number:
            raise ValueError(
                f"min_number ({self.min_number}) must be <= max_number ({self.max_number})"
            )
        if self.min_target > self.max_target:
            raise ValueError(
                f"min_target ({self.min_target}) must be <= max_target ({self.max_target})"
            )
        return self


@dataclass(frozen=True)
class Problem:
    """Input numbers, a target, and one solution (None when the problem has none)."""

    numbers: tuple[int, ...]
    target: int
    solution: tuple[str, ...] | None

    @property
    def solvable(self) -> bool:
        return self.solution is not None

    @property
    def key(self) -> tuple[tuple[int, ...], int]:
        """Identity for split overlap: the multiset of numbers and the target."""
        return tuple(sorted(self.numbers)), self.target

    def to_dict(self) -> dict[str, Any]:
        return {
            "numbers": list(self.numbers),
            "target": self.target,
            "solution": None if self.solution is None else list(self.solution),
            "solvable": self.solvable,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], num_inputs: int | None = None) -> "Problem":
        """A Problem from {"numbers": [...], "target": N, "solution"?: [...]}; other keys are
        ignored. Without a solution one is searched for. ValueError says what is malformed."""
        if not isinstance(d, dict):
            raise ValueError(f"expected a JSON object, got {type(d).__name__}")
        for key in ("numbers", "target"):
            if key not in d:
                raise ValueError(f"missing key {key!r}")
        numbers, target = d["numbers"], d["target"]
        if not isinstance(numbers, list):
            raise ValueError(f"'numbers' must be a list of integers, got {numbers!r}")
        for n in numbers:
            if not _is_int(n) or n < 0:
                raise ValueError(f"'numbers' must hold non-negative integers, got {n!r}")
        if not _is_int(target) or target < 0:
            raise ValueError(f"'target' must be a non-negative integer, got {target!r}")
        if num_inputs is not None and len(numbers) != num_inputs:
            raise ValueError(f"expected {num_inputs} numbers, got {len(numbers)}")
        if not MIN_INPUTS <= len(numbers) <= MAX_INPUTS:
            raise ValueError(
                f"expected {MIN_INPUTS} to {MAX_INPUTS} numbers, got {len(numbers)}"
            )
        solution = d.get("solution")
        if solution is None:
            solution = solve(numbers, target)
        elif not (isinstance(solution, list) and all(isinstance(op, str) for op in solution)):
            raise ValueError(f"'solution' must be a list of strings, got {solution!r}")
        return cls(tuple(numbers), target, None if solution is None else tuple(solution))


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def load_problems_jsonl(path: str | Path, num_inputs: int | None = None) -> list[Problem]:
    """Problems from a file of one {"numbers": [...], "target": N} per line (blank lines are
    skipped). Unsolvable problems are kept and marked (solvable False). A malformed line raises
    ValueError naming the file, the line number and what is wrong."""
    problems, unsolvable = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: bad JSON ({e.msg})") from None
            try:
                problems.append(Problem.from_dict(record, num_inputs))
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: {e}") from None
            if not problems[-1].solvable:
                unsolvable.append(lineno)
    if unsolvable:  # kept (a user may mean to test that the policy gives up), but never silently
        lines = ", ".join(map(str, unsolvable[:10])) + (", ..." if len(unsolvable) > 10 else "")
        warnings.warn(f"{path}: {len(unsolvable)} of {len(problems)} problems have no solution (lines {lines}); "
                      "they are evaluated and count as failures, so the accuracy can reach at most "
                      f"{1 - len(unsolvable) / len(problems):.1%}", stacklevel=2)
    return problems


def split_targets(config: CountdownConfig) -> tuple[list[int], list[int], list[int]]:
    """(seen, valid, unseen) target values, from one seeded shuffle: the first unseen_target_frac
    are unseen (the choice made before the valid split existed, so the test split kept its
    targets), the next valid_target_frac are the valid split's, the rest are seen. At least one
    target is always left seen."""
    targets = list(range(config.min_target, config.max_target + 1))
    random.Random(config.seed).shuffle(targets)

    def count(frac: float) -> int:  # round() first: 100 * 0.29 = 28.999999999999996 still holds out 29
        return math.floor(round(len(targets) * frac, 9))

    n_unseen = min(count(config.unseen_target_frac), len(targets) - 1)
    n_valid = min(count(config.valid_target_frac), len(targets) - 1 - n_unseen)
    unseen, valid = targets[:n_unseen], targets[n_unseen : n_unseen + n_valid]
    return sorted(targets[n_unseen + n_valid :]), sorted(valid), sorted(unseen)


def generate_problem(rng: random.Random, targets: list[int], config: CountdownConfig) -> Problem:
    """Pick a target, then draw numbers until the target can be reached (paper's rejection)."""
    target = rng.choice(targets)
    lo, hi, k = config.min_number, config.max_number, config.num_inputs
    for _ in range(MAX_DRAWS):
        numbers = [rng.randint(lo, hi) for _ in range(k)]
        if can_reach(numbers, target):
            return Problem(tuple(numbers), target, tuple(solve(numbers, target)))
    raise ValueError(
        f"no solvable problem with target {target} in {MAX_DRAWS} draws of {k} numbers in "
        f"[{lo}, {hi}]: widen min_number..max_number or change the target range"
    )


class CountdownTasks(TaskSource):
    """The Countdown splits of one config (see the module docstring)."""

    def __init__(self, config: CountdownConfig):
        self.config = config
        self.seen_targets, self.valid_targets, self.unseen_targets = split_targets(config)
        self._cache: dict[str, list[Problem]] = {}

    def splits(self) -> list[str]:
        return ([TRAIN_SPLIT] + ([VALID_SPLIT] if self.valid_targets else []) + [HELDOUT_SEEN]
                + ([HELDOUT_UNSEEN] if self.unseen_targets else []))

    def _size_key(self, split: str) -> str:
        """The config key that sizes `split` (named in errors)."""
        if split == TRAIN_SPLIT:
            return "train_size"
        return "valid_size" if split == VALID_SPLIT else "heldout_size"

    def size(self, split: str) -> int:
        self._check_split(split)
        if split == VALID_SPLIT and self.config.valid_size is not None:
            return self.config.valid_size
        return self.config.train_size if split == TRAIN_SPLIT else self.config.heldout_size

    def _rng(self, split: str) -> random.Random:
        # A string seed is hashed with SHA-512 by random.Random: stable across processes.
        return random.Random(f"countdown/{self.config.seed}/{split}")

    def iter_problems(self, split: str) -> Iterator[Problem]:
        """The split's problems in order, generated lazily (unbounded; slice what you need)."""
        self._check_split(split)
        rng = self._rng(split)
        if split == TRAIN_SPLIT:
            excluded = {p.key for p in self.problems(HELDOUT_SEEN)}
            yield from self._draw(rng, self.seen_targets, excluded, distinct=False, split=split)
        elif split == HELDOUT_SEEN:
            yield from self._draw(rng, self.seen_targets, set(), distinct=True, split=split)
        elif split == VALID_SPLIT:
            yield from self._draw(rng, self.valid_targets, set(), distinct=True, split=split)
        else:
            yield from self._draw(rng, self.unseen_targets, set(), distinct=True, split=split)

    def _draw(self, rng, targets, excluded, distinct, split) -> Iterator[Problem]:
        seen = set(excluded)
        rejected_in_a_row = 0
        while True:
            problem = generate_problem(rng, targets, self.config)
            if problem.key in seen:
                rejected_in_a_row += 1
                if rejected_in_a_row > MAX_DRAWS:
                    raise ValueError(
                        f"countdown {split}: ran out of new problems after {MAX_DRAWS} repeats; "
                        f"widen the number/target ranges or lower {self._size_key(split)}"
                    )
                continue
            rejected_in_a_row = 0
            if distinct:
                seen.add(problem.key)
            yield problem

    def problems(self, split: str, n: int | None = None) -> list[Problem]:
        """The first n problems of a split (default: its configured size)."""
        n = self.size(split) if n is None else n
        cached = self._cache.get(split, [])
        if len(cached) < n:
            it = self.iter_problems(split)
            cached = [next(it) for _ in range(n)]
            self._cache[split] = cached
        return cached[:n]

    def tasks(self, split: str) -> list[dict]:
        return [
            {"id": f"countdown/{split}/{i}", **p.to_dict()}
            for i, p in enumerate(self.problems(split))
        ]

    def task_key(self, task: dict) -> Any:
        return tuple(sorted(task["numbers"])), task["target"]

    def tasks_from_file(self, path: str) -> list[dict]:
        """Problems from a JSONL file, one {"numbers": [...], "target": N} per line."""
        problems = load_problems_jsonl(path, num_inputs=self.config.num_inputs)
        return [{"id": f"{Path(path).name}/{i}", **p.to_dict()} for i, p in enumerate(problems)]

    def sample_tasks(self, split: str, n: int, rng: random.Random, skip: int = 0) -> list[dict]:
        """Train tasks are drawn fresh from the train distribution (the split is ~unbounded, so
        `skip` changes nothing there)."""
        if split != TRAIN_SPLIT:
            return super().sample_tasks(split, n, rng, skip)
        return [self.sample_train(rng).to_dict() for _ in range(n)]

    def sample_train(self, rng: random.Random) -> Problem:
        """A fresh problem from the train distribution (never a heldout_seen one)."""
        excluded = {p.key for p in self.problems(HELDOUT_SEEN)}
        return next(self._draw(rng, self.seen_targets, excluded, distinct=False, split="train"))
