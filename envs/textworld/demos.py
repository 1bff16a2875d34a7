"""Expert demonstrations for SFT: a game's walkthrough replayed in the env.

A demonstration is multi-turn:

    {"turns": [{"observation": str, "action": str}, ...],   # what the env showed, then the
                                                             # walkthrough's command
     "final_observation": str, "won": bool, "score": int, "max_score": int, "task": {...},
     "prompt": str, "completion": str, "action_spans": [[start, end], ...]}

The observations are exactly what the env shows under the config (replayed, not rebuilt), so a
policy sees the same text in SFT and in play.

Detours (`mistakes` > 0, DART-style): a walkthrough only ever shows states on the expert's path,
so a policy that strays once (drops the quest item, eats a distractor) meets a state it never saw
and tends to loop until the turn limit — the held-out failures of a walkthrough-trained policy.
In that fraction of the demos one turn, at a random point, is a random admissible command other
than the expert's next one (a random verb, then one of its commands), marked {"expert": False}
(in the context, not trained on); the rest is the game's own planner's plan from the state the
detour left (textworld's policy_commands), so the policy learns to recover. A detour that loses
the game, or whose recovery does not win within max_turns, is dropped and the demo is the plain
walkthrough.

`prompt` / `completion` / `action_spans` come from flatten_demo(): one text in which each action
follows a "> " line prefix, for trainers that take a single prompt and completion.
"""

from __future__ import annotations

import random
from typing import Any, Iterable, Iterator

from pydantic import Field

from ..base import DemoOptions
from .config import TextWorldConfig
from .env import TextWorldEnv
from .format import ACTION_PREFIX
from .tasks import TextWorldTasks

DISPLAY_OPTIONS = ("admissible_commands", "show_objective", "show_description", "show_inventory",
                   "max_turns")


class TextWorldDemoOptions(DemoOptions):
    """`sft.demos` keys of the TextWorld env."""

    # The fraction of demos that take one random detour (in the context, not trained on), then
    # recover by the game's own planner (see the module docstring)
    mistakes: float = Field(0.0, ge=0, le=1)


def detour_command(rng: random.Random, admissible: list[str], expert_action: str) -> str | None:
    """A random admissible command other than the expert's (None when there is none): a verb
    first, then one of its commands, since otherwise most detours are "examine ..."."""
    others = [c for c in admissible if c != expert_action]
    if not others:
        return None
    verb = rng.choice(sorted({c.split()[0] for c in others}))
    return rng.choice([c for c in others if c.split()[0] == verb])


def demonstration(env: TextWorldEnv, task: dict, detour_rng: random.Random | None = None) -> dict:
    """Replay the task's walkthrough in `env`; the demo records every observation and action.
    With `detour_rng` (and an env built with expert=True) one random turn is a detour (above)."""
    walkthrough = task.get("walkthrough")
    if not walkthrough:
        raise ValueError(f"task {task.get('id', task.get('game'))!r} has no walkthrough")
    detour_at = detour_rng.randrange(len(walkthrough)) if detour_rng is not None else None
    obs, info = env.reset(options={"task": task})
    turns = []
    plan = list(walkthrough)
    won = terminated = truncated = False
    while plan and not (terminated or truncated):
        if len(turns) == detour_at:
            action = detour_command(detour_rng, info["admissible_actions"], plan[0])
            if action is not None:
                turns.append({"observation": obs, "action": action, "expert": False})
                obs, _, terminated, truncated, info = env.step(action)
                plan = env.expert_plan()
                if terminated or truncated or not plan:  # lost, won by chance, or out of turns
                    return demonstration(env, task)
                continue
        action = plan.pop(0)
        turns.append({"observation": obs, "action": action})
        obs, _, terminated, truncated, info = env.step(action)
    won = info["won"]
    if detour_at is not None and not won:
        return demonstration(env, task)
    demo = {"turns": turns, "final_observation": obs, "won": won, "score": info["score"],
            "max_score": info["max_score"], "task": dict(task)}
    return {**demo, **flatten_demo(demo)}


def demonstrations(tasks: Iterable[dict], config: TextWorldConfig, skip_unwon: bool = True,
                   mistakes: float = 0.0, seed: int = 0, **options: Any) -> Iterator[dict]:
    """Demos for tasks with a walkthrough, played in an env of `config` (with `options`
    overriding its display keys). Walkthroughs that do not win within max_turns are skipped
    unless skip_unwon is False. A `mistakes` fraction of the demos take one detour (above),
    drawn reproducibly from `seed` and the task."""
    return (d for d in demos_by_task(tasks, config, skip_unwon, mistakes, seed, **options) if d is not None)


def demos_by_task(tasks: Iterable[dict], config: TextWorldConfig, skip_unwon: bool = True,
                  mistakes: float = 0.0, seed: int = 0, **options: Any) -> Iterator[dict | None]:
    """demonstrations(), one entry per task: None where it has no walkthrough or (skip_unwon)
    the walkthrough does not win."""
    unknown = set(options) - set(DISPLAY_OPTIONS)
    if unknown:
        raise ValueError(f"unknown textworld demo options {sorted(unknown)}; "
                         f"choose from {list(DISPLAY_OPTIONS) + ['mistakes']}")
    if not 0.0 <= mistakes <= 1.0:
        raise ValueError(f"mistakes must be a fraction in [0, 1], got {mistakes}")
    env = TextWorldEnv(type(config)(**{**config.model_dump(), **options}), expert=mistakes > 0)  # validated
    try:
        for task in tasks:
            if not task.get("walkthrough"):
                yield None
                continue
            rng = random.Random(f"textworld-mistakes/{seed}/{task.get('id', task['game'])}")
            demo = demonstration(env, task, rng if mistakes and rng.random() < mistakes else None)
            yield demo if demo["won"] or not skip_unwon else None
    finally:
        env.close()


def flatten_demo(demo: dict, action_prefix: str = ACTION_PREFIX) -> dict:
    """One text for a multi-turn demo:

        <observation 1>
        > <action 1>
        <observation 2>
        > <action 2>

    as {"prompt": first observation + "\\n" + prefix, "completion": the rest up to the last
    action, "action_spans": [[start, end], ...] of each expert action in prompt + completion}. The
    completion holds the env's text between actions too; mask with action_spans to train on
    the actions only."""
    turns = demo["turns"]
    if not turns:
        raise ValueError("a demo needs at least one turn")
    prompt = turns[0]["observation"] + "\n" + action_prefix
    pieces: list[str] = []
    spans: list[list[int]] = []
    length = len(prompt)
    for i, turn in enumerate(turns):
        if i > 0:
            between = "\n" + turn["observation"] + "\n" + action_prefix
            pieces.append(between)
            length += len(between)
        pieces.append(turn["action"])
        if turn.get("expert", True):  # a detour is context, not a target
            spans.append([length, length + len(turn["action"])])
        length += len(turn["action"])
    return {"prompt": prompt, "completion": "".join(pieces), "action_spans": spans}


def demo_pairs(demo: dict) -> list[tuple[str, str]]:
    """The essential content of a demo: (observation, action) pairs in order."""
    return [(t["observation"], t["action"]) for t in demo["turns"]]


def task_demonstrations(source: TextWorldTasks, split: str, n: int, seed: int = 0, start: int = 0,
                        **options: Any) -> Iterator[dict | None]:
    """The registered demonstration builder: walkthrough demos for the tasks [start, n) of `split`
    (None where dropped), replayed in the source's config; `options` override its display keys
    (DISPLAY_OPTIONS) and `mistakes` is the fraction of demos with a detour; `seed` picks the
    detours (walkthroughs themselves are deterministic)."""
    return demos_by_task(source.tasks(split)[start:n], source.config, seed=seed, **options)
