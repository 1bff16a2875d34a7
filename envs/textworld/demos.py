"""Expert demonstrations for SFT: a game's walkthrough replayed in the env.

A demonstration is multi-turn:

    {"turns": [{"observation": str, "action": str}, ...],   # what the env showed, then the
                                                             # walkthrough's command
     "final_observation": str, "won": bool, "score": int, "max_score": int, "task": {...},
     "prompt": str, "completion": str, "action_spans": [[start, end], ...]}

The observations are exactly what the env shows under the config (replayed, not rebuilt), so a
policy sees the same text in SFT and in play. `prompt` / `completion` / `action_spans` come
from flatten_demo(): one text in which each action follows a "> " line prefix, for trainers
that take a single prompt and completion.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

from .config import TextWorldConfig
from .env import TextWorldEnv

ACTION_PREFIX = "> "
DISPLAY_OPTIONS = ("admissible_commands", "show_description", "show_inventory", "max_turns")


def demonstration(env: TextWorldEnv, task: dict) -> dict:
    """Replay the task's walkthrough in `env`; the demo records every observation and action."""
    walkthrough = task.get("walkthrough")
    if not walkthrough:
        raise ValueError(f"task {task.get('id', task.get('game'))!r} has no walkthrough")
    obs, info = env.reset(options={"task": task})
    turns = []
    won = terminated = truncated = False
    for action in walkthrough:
        turns.append({"observation": obs, "action": action})
        obs, _, terminated, truncated, info = env.step(action)
        won = info["won"]
        if terminated or truncated:
            break
    demo = {"turns": turns, "final_observation": obs, "won": won, "score": info["score"],
            "max_score": info["max_score"], "task": dict(task)}
    return {**demo, **flatten_demo(demo)}


def demonstrations(tasks: Iterable[dict], config: TextWorldConfig, skip_unwon: bool = True,
                   **options: Any) -> Iterator[dict]:
    """Demos for tasks with a walkthrough, played in an env of `config` (with `options`
    overriding its display keys). Walkthroughs that do not win within max_turns are skipped
    unless skip_unwon is False."""
    unknown = set(options) - set(DISPLAY_OPTIONS)
    if unknown:
        raise ValueError(f"unknown textworld demo options {sorted(unknown)}; "
                         f"choose from {list(DISPLAY_OPTIONS)}")
    env = TextWorldEnv(type(config)(**{**config.model_dump(), **options}))  # validated
    try:
        for task in tasks:
            if not task.get("walkthrough"):
                continue
            demo = demonstration(env, task)
            if demo["won"] or not skip_unwon:
                yield demo
    finally:
        env.close()


def flatten_demo(demo: dict, action_prefix: str = ACTION_PREFIX) -> dict:
    """One text for a multi-turn demo:

        <observation 1>
        > <action 1>
        <observation 2>
        > <action 2>

    as {"prompt": first observation + "\\n" + prefix, "completion": the rest up to the last
    action, "action_spans": [[start, end], ...] of each action in prompt + completion}. The
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
        spans.append([length, length + len(turn["action"])])
        length += len(turn["action"])
    return {"prompt": prompt, "completion": "".join(pieces), "action_spans": spans}


def demo_pairs(demo: dict) -> list[tuple[str, str]]:
    """The essential content of a demo: (observation, action) pairs in order."""
    return [(t["observation"], t["action"]) for t in demo["turns"]]
