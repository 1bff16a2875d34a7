"""Expert demonstrations for SFT on the single-turn `countdown` env.

A demonstration is the env's prompt (the problem's first "Current State" line) and the text the
policy should write after it; prompt + "\n" + completion is the whole stream.
"""

from __future__ import annotations

import random
from typing import Iterable, Iterator, Literal

from .problems import Problem
from .search import optimal_stream, random_stream, state_line

DemoFormat = Literal["sos", "optimal"]


def demonstration(problem: Problem, rng: random.Random, format: DemoFormat = "sos", **search) -> dict:
    """One demo. "sos": a stream by a randomly picked search, as in the paper's data (it may not
    reach the goal: see `goal_reached`); `search` narrows the pick (random_stream's strategies,
    heuristics, beams). "optimal": the solution path without search."""
    if not problem.solvable:
        raise ValueError(f"problem {problem.to_dict()} has no solution to demonstrate")
    if format == "sos":
        stream = random_stream(problem, rng, **search)
        text, facts = stream.text, {k: v for k, v in stream.to_dict().items() if k != "text"}
    elif format == "optimal":
        text = optimal_stream(problem.numbers, problem.target, problem.solution)
        facts = {"search_type": "optimal", "heuristic": "", "goal_reached": True}
    else:
        raise ValueError(f"unknown demo format {format!r}; choose 'sos' or 'optimal'")
    prompt = state_line(problem.target, problem.numbers, [])
    first, _, completion = text.partition("\n")
    assert first == prompt  # every writer starts from the problem's state line
    return {"prompt": prompt, "completion": completion, "problem": problem.to_dict(), **facts}


def demonstrations(
    problems: Iterable[Problem], format: DemoFormat = "sos", seed: int = 0, **search
) -> Iterator[dict]:
    """Demos for a sequence of problems, reproducible from `seed`."""
    rng = random.Random(f"countdown-demos/{seed}")
    for problem in problems:
        yield demonstration(problem, rng, format, **search)
