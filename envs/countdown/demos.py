"""Expert demonstrations for SFT on the single-turn `countdown` env.

A demonstration is the env's prompt (the problem's first "Current State" line) and the text the
policy should write after it; prompt + "\n" + completion is the whole stream.

With `mistakes` > 0 that fraction of the demos also carry `segments`: the stream with one
rejected move spliced in — a wrong line of the kind small policies write (wrong arithmetic, a
number that is not there), the multi-turn env's own "Invalid action" reply to it, then the
stream going on from the same node. SFT trains on the stream and not on the wrong line, so the
policy learns to recover from a rejected move in multi-turn play instead of derailing (without
it, 128 of the SFT policy's 131 held-out failures began with one rejected move; docs/rl.md).
"""

from __future__ import annotations

import itertools
import random
import re
from typing import Any, Iterable, Iterator, Literal

from pydantic import Field

from ..base import DemoOptions
from .env import CountdownSearchConfig, CountdownSearchEnv, stream_to_actions
from .problems import CountdownTasks, Problem
from .search import optimal_stream, random_stream, state_line

DemoFormat = Literal["sos", "optimal"]


class CountdownDemoOptions(DemoOptions):
    """`sft.demos` keys of the Countdown envs. Only the keys a recipe sets reach demonstrations();
    the defaults here are its own."""

    # "sos" = streams of search, "optimal" = the solution path only (the paper's baseline)
    format: DemoFormat = "sos"
    # The searches a "sos" stream is written by, each picked at random per problem (the paper: all)
    strategies: list[Literal["dfs", "bfs"]] = ["dfs", "bfs"]
    heuristics: list[Literal["sum", "mult"]] = ["sum", "mult"]
    beams: list[int] = [1, 2, 3, 4, 5]
    # The fraction of demos with a rejected move spliced into the context, not trained on, and
    # the env's "Invalid action" reply to it, so the policy learns to recover (with_mistake)
    mistakes: float = Field(0.0, ge=0, le=1)


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


def with_mistake(demo: dict, rng: random.Random) -> dict:
    """The demo plus `segments` [(text, trained_on), ...] holding one rejected move (see the
    module docstring), or the demo unchanged when its stream does not replay as multi-turn
    actions (BFS streams) or no line could be spoiled."""
    lines = demo["completion"].split("\n")
    spots = [k for k, line in enumerate(lines) if line.startswith("Exploring Operation:")]
    if not spots or demo.get("search_type", "dfs").startswith("bfs"):
        return demo
    k = rng.choice(spots)
    env = CountdownSearchEnv(CountdownSearchConfig(max_turns=10_000, max_backtracks=10_000))
    env.reset(options={"task": demo["problem"]})
    for action in stream_to_actions("\n".join([demo["prompt"], *lines[:k]])):
        env.step(action)
    if env.current is None:  # the stream explores from a dead end: it does not replay
        return demo
    bad = _spoil(lines[k], env.nodes[env.current].nums, rng)
    if bad is None:
        return demo
    reply, *_ = env.step(stream_to_actions(bad)[0])
    if not reply.startswith("Invalid action:"):
        return demo
    before = "\n".join(lines[:k]) + "\n" if k else ""
    segments = [[demo["prompt"] + "\n", False], [before, True], [bad + "\n", False], [reply + "\n", False],
                ["\n".join(lines[k:]), True]]
    return {**demo, "segments": [s for s in segments if s[0]]}


def _spoil(line: str, nums: list[int], rng: random.Random) -> str | None:
    """A wrong version of an "Exploring Operation" line at a node holding `nums`: mostly wrong
    arithmetic (the commonest rejected move of the SFT policy), else an operand not present."""
    m = re.match(r"Exploring Operation: (\d+)([-+*/])(\d+)=(\d+), Resulting Numbers: \[(.*)\]$", line)
    if m is None:
        return None
    a, op, b, result = int(m[1]), m[2], int(m[3]), int(m[4])
    rest = [int(x) for x in m[5].split(",")][:-1]  # the untouched numbers (the result is last)
    if rng.random() < 0.8:
        wrong = rng.choice([d for d in (-2, -1, 1, 2, 10, -10) if result + d >= 0])
        return f"Exploring Operation: {a}{op}{b}={result + wrong}, Resulting Numbers: {rest + [result + wrong]}"
    absent = [n for n in range(1, max(nums) + 3) if n not in nums]
    if not absent:
        return None
    a = rng.choice(absent)
    return f"Exploring Operation: {a}{op}{b}={result}, Resulting Numbers: {rest + [result]}"


def demonstrations(
    problems: Iterable[Problem], format: DemoFormat = "sos", seed: int = 0, mistakes: float = 0.0, **search
) -> Iterator[dict]:
    """Demos for a sequence of problems, reproducible from `seed`; a `mistakes` fraction of them
    with one rejected move and its recovery (with_mistake)."""
    if not 0.0 <= mistakes <= 1.0:
        raise ValueError(f"mistakes must be a fraction in [0, 1], got {mistakes}")
    rng = random.Random(f"countdown-demos/{seed}")
    spoil_rng = random.Random(f"countdown-mistakes/{seed}")  # the streams do not depend on it
    for problem in problems:
        demo = demonstration(problem, rng, format, **search)
        if mistakes and spoil_rng.random() < mistakes:
            demo = with_mistake(demo, spoil_rng)
        yield demo


def task_demonstrations(source: CountdownTasks, split: str, n: int, seed: int = 0, start: int = 0,
                        **options: Any) -> Iterator[dict]:
    """The registered demonstration builder: demos of the problems [start, n) of `split` (none is
    dropped); `options` are CountdownDemoOptions' (format, mistakes, and random_stream's
    strategies/heuristics/beams). The streams share one random generator, so a resumed run
    replays the first `start` (thousands a second) to draw the same ones."""
    demos = demonstrations(itertools.islice(source.iter_problems(split), n), seed=seed, **options)
    return itertools.islice(demos, start, None)
