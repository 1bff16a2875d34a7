"""Expert demonstrations for SFT: the planner's plan replayed in the env, with detour demos.

A demonstration is TextWorld's multi-turn demo (envs/textworld/demos.py, whose replay this
reuses): {"turns": [{"observation", "action"}, ...], "final_observation", "won", "task", "prompt",
"completion", "action_spans"}; the observations are exactly what the env shows. A `mistakes`
fraction of the demos take one detour: at a random turn, a random admissible command (a verb
first, then one of its commands), marked {"expert": False} and not trained on, then the planner's
plan from the state the detour left (env.expert_plan(): the config's planner, the exact expert of
expert.py by default, planning from the game's current PDDL state), so the policy sees how to
recover. Official games carry no plan: the planner's plan from the start is asked for when a demo
needs it.

With `search` (sft.demos.search) the searching expert of search.py plays instead: it looks for
what the task needs in the order the train games make likely, where the planner walks straight to
the hidden object, which a policy in an unseen room cannot know.
"""

from __future__ import annotations

import random
from typing import Iterable, Iterator

from pydantic import Field

from ..base import TRAIN_SPLIT
from ..textworld.demos import TextWorldDemoOptions, demonstration
from .config import AlfWorldConfig
from .env import AlfWorldEnv
from .search import SearchPrior, searching_demonstration

class AlfWorldDemoOptions(TextWorldDemoOptions):
    """`sft.demos` keys: TextWorld's `mistakes` (the fraction of demos with one detour), and
    `search`: the searching expert of search.py (look for the object in the order the train
    games make likely) instead of the planner, which walks straight to where it knows it is."""

    search: bool = Field(False, description="demos from the searching expert (envs/alfworld/search.py) "
                         "instead of the all-knowing planner")


def with_walkthrough(env: AlfWorldEnv, task: dict) -> dict:
    """The task with its expert plan (asked of the planner when the task has none)."""
    if task.get("walkthrough"):
        return task
    env.reset(options={"task": task})
    return {**task, "walkthrough": env.expert_plan()}


def demonstrations(tasks: Iterable[dict], config: AlfWorldConfig, mistakes: float = 0.0,
                   seed: int = 0, search: SearchPrior | None = None) -> Iterator[dict]:
    """Demos of the tasks whose expert plan wins within max_turns, played in an env of `config`;
    a `mistakes` fraction take one detour, drawn reproducibly from `seed` and the task. With a
    `search` prior, the searching expert plays (search.py)."""
    return (d for d in demos_by_task(tasks, config, mistakes, seed, search) if d is not None)


def demos_by_task(tasks: Iterable[dict], config: AlfWorldConfig, mistakes: float = 0.0,
                  seed: int = 0, search: SearchPrior | None = None) -> Iterator[dict | None]:
    """demonstrations(), one entry per task: None where the plan is missing or does not win."""
    if not 0.0 <= mistakes <= 1.0:
        raise ValueError(f"mistakes must be a fraction in [0, 1], got {mistakes}")
    env = AlfWorldEnv(config)
    try:
        for task in tasks:
            task = with_walkthrough(env, task)
            if not task["walkthrough"]:
                yield None
                continue
            rng = random.Random(f"alfworld-mistakes/{seed}/{task.get('id', task['game'])}")
            detour = rng if mistakes and rng.random() < mistakes else None
            if search is not None:
                demo = searching_demonstration(env, task, search, detour)
            else:
                demo = demonstration(env, task, detour)
            yield demo if demo["won"] else None
    finally:
        env.close()


def task_demonstrations(source, split: str, n: int, seed: int = 0, start: int = 0,
                        mistakes: float = 0.0, search: bool = False) -> Iterator[dict | None]:
    """The registered demonstration builder: the expert's demo of each of the tasks [start, n) of
    `split` (None where dropped); the searching expert's prior comes from the whole train split."""
    prior = SearchPrior(source.tasks(TRAIN_SPLIT)) if search else None
    return demos_by_task(source.tasks(split)[start:n], source.config, mistakes=mistakes, seed=seed, search=prior)
