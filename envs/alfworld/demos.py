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
"""

from __future__ import annotations

import random
from typing import Iterable, Iterator

from ..textworld.demos import TextWorldDemoOptions, demonstration
from .config import AlfWorldConfig
from .env import AlfWorldEnv

# The same `sft.demos` keys as TextWorld: `mistakes`, the fraction of demos with one detour.
AlfWorldDemoOptions = TextWorldDemoOptions


def with_walkthrough(env: AlfWorldEnv, task: dict) -> dict:
    """The task with its expert plan (asked of the planner when the task has none)."""
    if task.get("walkthrough"):
        return task
    env.reset(options={"task": task})
    return {**task, "walkthrough": env.expert_plan()}


def demonstrations(tasks: Iterable[dict], config: AlfWorldConfig, mistakes: float = 0.0,
                   seed: int = 0) -> Iterator[dict]:
    """Demos of the tasks whose expert plan wins within max_turns, played in an env of `config`;
    a `mistakes` fraction take one detour, drawn reproducibly from `seed` and the task."""
    return (d for d in demos_by_task(tasks, config, mistakes, seed) if d is not None)


def demos_by_task(tasks: Iterable[dict], config: AlfWorldConfig, mistakes: float = 0.0,
                  seed: int = 0) -> Iterator[dict | None]:
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
            demo = demonstration(env, task, rng if mistakes and rng.random() < mistakes else None)
            yield demo if demo["won"] else None
    finally:
        env.close()


def task_demonstrations(source, split: str, n: int, seed: int = 0, start: int = 0,
                        mistakes: float = 0.0) -> Iterator[dict | None]:
    """The registered demonstration builder: the expert's demo of each of the tasks [start, n) of
    `split` (None where dropped)."""
    return demos_by_task(source.tasks(split)[start:n], source.config, mistakes=mistakes, seed=seed)
