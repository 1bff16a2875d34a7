"""Countdown environments.

countdown         single turn: the observation is the problem's first "Current State" line; the
                  action is a whole stream of search; it is verified and the episode ends.
countdown_search  many turns: the agent grows a search tree one line at a time, an operation on
                  two numbers of its current node or "Moving to Node #<id>" back to a generated
                  node, and the env answers in the stream-of-search vocabulary. Node ids follow
                  the paper's DFS numbering (the k-th move explored at a node, dead ends
                  included), so the lines of a DFS stream replay as actions.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from ..base import TextEnv, make_info, quantize
from .problems import CountdownConfig, CountdownTasks, Problem
from .search import (
    NO_SOLUTION,
    can_reach,
    combine,
    explore_line,
    generated_line,
    leaf_line,
    state_line,
)
from .verify import MAX_DIGITS, NUM, true_result, verify_stream

# ---------------------------------------------------------------------------------------------
# Shared


def _problem_from_task(task: Any) -> Problem:
    if isinstance(task, Problem):
        return task
    if isinstance(task, dict):
        return Problem.from_dict(task)
    raise TypeError(f"options['task'] must be a task dict or Problem, got {type(task).__name__}")


class _CountdownEnv(TextEnv):
    """Task handling shared by both Countdown envs."""

    def __init__(self, config: CountdownConfig):
        super().__init__()
        self.config = config
        self._tasks: CountdownTasks | None = None  # built only if reset() has to draw a task
        self.problem: Problem | None = None

    def _reset_problem(self, seed: int | None, options: dict | None) -> Problem:
        super().reset(seed=seed)
        task = (options or {}).get("task")
        if task is not None:
            return _problem_from_task(task)
        # No task given: a fresh train-distribution problem, reproducible from the seed.
        if self._tasks is None:
            self._tasks = CountdownTasks(self.config)
        rng = random.Random(int(self.np_random.integers(2**63)))
        return self._tasks.sample_train(rng)


# ---------------------------------------------------------------------------------------------
# Single turn: write the whole stream


class CountdownStreamEnv(_CountdownEnv):
    """One turn: the agent writes a stream of search; reward 1.0 if it reaches the goal by a
    valid path. The episode has a single turn, so dense and sparse rewards coincide."""

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        self.problem = self._reset_problem(seed, options)
        self._done = False
        p = self.problem
        info = make_info(False, {}, problem=p.to_dict())
        return state_line(p.target, p.numbers, []), info

    def step(self, action: str):
        if self.problem is None or self._done:
            raise RuntimeError("the episode is over (or never started): call reset()")
        self._done = True
        p = self.problem
        verdict = verify_stream(action, p.numbers, p.target)
        reward = 1.0 if verdict.ok else 0.0
        obs = f"Verdict: {'correct' if verdict.ok else 'incorrect'}: {verdict.reason}"
        info = make_info(
            verdict.ok,
            {"goal": reward},
            reason=verdict.reason,
            operations=verdict.operations,
            # the paper's search cost: how many moves the stream explored
            explored=action.count("Exploring Operation") if isinstance(action, str) else 0,
        )
        return obs, reward, True, False, info


# ---------------------------------------------------------------------------------------------
# Multi-turn: grow the search tree


class CountdownSearchConfig(CountdownConfig):
    """Config of the multi-turn search env: the problem fields plus the episode budgets."""

    max_turns: int = Field(40, ge=1, description="turns before the episode is truncated")
    max_backtracks: int = Field(
        20, ge=0, description="'Moving to Node' jumps allowed; a dead end with none left loses"
    )


MOVE_RE = re.compile(r"^Moving to Node #\s*([0-9]+(?:\s*,\s*[0-9]+)*)\s*\.?$", re.IGNORECASE)
ACTION_OP_RE = re.compile(
    rf"^(?:Exploring Operation:\s*)?({NUM})\s*([-+*/])\s*({NUM})\s*(?:=\s*(-?{NUM}))?\s*(?:,.*)?$",
    re.IGNORECASE,
)

INSTRUCTIONS = (
    "Reach the target by combining two of the current numbers per turn with +, -, * or / "
    "(larger minus smaller; exact division of larger by smaller). Write one line per turn: an "
    "operation such as '66-42=24', or 'Moving to Node #<id>' to go back to a generated node. "
    "After 'unequal: No Solution' you must move back to a generated node."
)

@dataclass
class SearchNode:
    id: str
    nums: list[int]
    ops: list[str]
    explored: int = 0  # moves tried here so far, dead ends included: numbers the next child

    @property
    def depth(self) -> int:
        return len(self.ops)


class CountdownSearchEnv(_CountdownEnv):
    """Multi-turn Countdown search (see the module docstring).

    Each step's info["reward_components"] holds 0/1 flags `valid` (the action was legal),
    `reachable` (the target can still be reached from where the agent now stands) and `goal`,
    plus `progress`, the dense progress paid this step. Dense reward: 0.5 * (deepest depth
    reached on a node from which the target is reachable) / (inputs - 1), paid as that maximum
    grows, then the rest up to 1.0 on the goal. Sparse reward: 1.0 on the goal.
    """

    def __init__(self, config: CountdownSearchConfig):
        super().__init__(config)
        self._over = True

    # -- episode bookkeeping ------------------------------------------------------------------

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        self.problem = p = self._reset_problem(seed, options)
        root = SearchNode("0", list(p.numbers), [])
        self.nodes: dict[str, SearchNode] = {root.id: root}
        self.current: str | None = root.id  # None: standing on a dead end, must move
        self.turns = 0
        self.backtracks = 0
        self._over = False
        self._won = False
        self._paid = 0.0
        self._best_depth = 0 if can_reach(p.numbers, p.target) else -1
        info = make_info(
            False,
            {},
            self.admissible_actions(),
            problem=p.to_dict(),
            instructions=INSTRUCTIONS,
            node=root.id,
        )
        return state_line(p.target, p.numbers, []), info

    @property
    def backtracks_left(self) -> int:
        return self.config.max_backtracks - self.backtracks

    def _potential(self, depth: int) -> float:
        steps = max(len(self.problem.numbers) - 1, 1)
        return quantize(0.5 * max(depth, 0) / steps)

    def admissible_actions(self) -> list[str]:
        """Every legal operation at the current node, then every allowed 'Moving to Node'."""
        if self._over:
            return []
        actions: list[str] = []
        if self.current is not None:
            nums = self.nodes[self.current].nums
            for i in range(len(nums)):
                for j in range(i + 1, len(nums)):
                    for _, op in combine(nums[i], nums[j]):
                        if op not in actions:
                            actions.append(op)
        if self.backtracks_left > 0:
            actions += [f"Moving to Node #{nid}" for nid in self.nodes if nid != self.current]
        return actions

    # -- one turn -----------------------------------------------------------------------------

    def step(self, action: str):
        if self._over:
            raise RuntimeError("the episode is over (or never started): call reset()")
        self.turns += 1
        line = next((ln.strip() for ln in str(action).splitlines() if ln.strip()), "")
        move = MOVE_RE.match(line)
        if move:
            obs, valid, lost = self._move(re.sub(r"\s+", "", move.group(1)))
        else:
            obs, valid, lost = self._operate(line)

        p = self.problem
        won = self._won
        if won:
            reachable = True
        elif self.current is None:
            reachable = False
        else:
            reachable = can_reach(self.nodes[self.current].nums, p.target)

        progress = 0.0
        if reachable and not won and self.current is not None:
            depth = self.nodes[self.current].depth
            if depth > self._best_depth:
                progress = self._potential(depth) - self._potential(self._best_depth)
                self._best_depth = depth
        if self.config.reward_density == "dense":
            progress_paid = progress
            reward = progress + (1.0 - self._paid if won else 0.0)
        else:
            progress_paid = 0.0
            reward = 1.0 if won else 0.0
        self._paid += progress_paid

        terminated = won or lost
        truncated = not terminated and self.turns >= self.config.max_turns
        self._over = terminated or truncated
        info = make_info(
            won,
            {
                "valid": float(valid),
                "reachable": float(reachable),
                "goal": float(won),
                "progress": progress_paid,
            },
            self.admissible_actions(),
            node=self.current,
            turn=self.turns,
            backtracks_left=self.backtracks_left,
            dead_end=self.current is None,
        )
        return obs, reward, terminated, truncated, info

    def _state(self) -> str:
        """The current-state line, or how to leave a dead end."""
        if self.current is None:
            nodes = ", ".join(f"#{nid}" for nid in self.nodes)
            return f"You are at a dead end: go back with 'Moving to Node #<id>' (nodes: {nodes})."
        node = self.nodes[self.current]
        return state_line(self.problem.target, node.nums, node.ops)

    def _invalid(self, why: str) -> tuple[str, bool, bool]:
        return f"Invalid action: {why}\n{self._state()}", False, False

    def _move(self, node_id: str) -> tuple[str, bool, bool]:
        """Go to a generated node. Returns (observation, valid, lost) like _operate."""
        if node_id not in self.nodes:
            known = ", ".join(f"#{nid}" for nid in self.nodes)
            return self._invalid(f"there is no Node #{node_id}; generated nodes: {known}.")
        if node_id == self.current:  # already there: nothing to undo, no budget spent
            return self._state(), True, False
        if self.backtracks_left <= 0:
            return self._invalid(f"no backtracks left (all {self.config.max_backtracks} used).")
        self.backtracks += 1
        self.current = node_id
        return self._state(), True, False

    def _operate(self, line: str) -> tuple[str, bool, bool]:
        """Apply an operation line. Returns (observation, valid, lost)."""
        m = ACTION_OP_RE.match(line)
        shown = repr(line[:80]) if line else "an empty line"
        if m is None and (long := re.search(rf"[0-9]{{{MAX_DIGITS + 1},}}", line)):
            return self._invalid(f"{shown} holds a number of {len(long[0])} digits; the numbers here have at "
                                 f"most {MAX_DIGITS}.")
        if m is None and any(c.isdigit() and not c.isascii() for c in line):
            return self._invalid(f"{shown} writes digits other than 0-9; write numbers in ASCII digits.")
        if m is None:
            return self._invalid(
                f"{shown} is neither an operation on two current numbers (like '66-42=24') "
                "nor 'Moving to Node #<id>'."
            )
        if self.current is None:
            return self._invalid("the last operation was a dead end; move back to a generated "
                                 "node before the next operation.")
        a, sym, b = int(m.group(1)), m.group(2), int(m.group(3))
        claimed = None if m.group(4) is None else int(m.group(4))
        node = self.nodes[self.current]

        rest = list(node.nums)
        for n in (a, b):
            if n not in rest:
                twice = " twice" if a == b and node.nums.count(n) == 1 else ""
                return self._invalid(f"{a}{sym}{b} uses {n}{twice}, but the current numbers "
                                     f"are {node.nums}.")
            rest.remove(n)
        result, why = true_result(a, sym, b)
        if result is None:
            return self._invalid(f"{why}.")
        if claimed is not None and claimed != result:
            return self._invalid(f"wrong arithmetic: {a}{sym}{b} is {result}, not {claimed}.")

        op = f"{a}{sym}{b}={result}"
        nums = rest + [result]
        target = self.problem.target
        # Like the paper's DFS, every move tried here gets the next number, even one tried
        # before (with repeated inputs DFS tries the same move from different pairs).
        child_id = f"{node.id},{node.explored}"
        node.explored += 1
        lines = [explore_line(op, nums)]
        if len(nums) == 1:
            lines.append(leaf_line(result, target))
            if result == target:
                self._won = True
                return "\n".join(lines), True, False
            self.current = None  # a dead end: the agent has to move back
            if self.backtracks_left <= 0:
                lines.append(f"No backtracks left. {NO_SOLUTION}")
                return "\n".join(lines), True, True
            return "\n".join(lines), True, False

        child = self.nodes[child_id] = SearchNode(child_id, nums, node.ops + [op])
        lines.append(generated_line(child_id, target, child.nums, op))
        lines.append(f"Moving to Node #{child_id}")
        lines.append(state_line(target, child.nums, child.ops))
        self.current = child_id
        return "\n".join(lines), True, False


def stream_to_actions(stream: str) -> list[str]:
    """The countdown_search actions that replay a DFS or optimal-path stream (a demonstration).

    Each explored operation becomes an action, and so does each "Moving to Node" line except
    the one right after its own "Generated Node" line (the env moves into a new node itself).
    BFS streams do not replay: they explore several children before moving into any.
    """
    actions: list[str] = []
    just_generated = None
    for line in stream.splitlines():
        if line.startswith("Exploring Operation:"):
            actions.append(line.split(",")[0].removeprefix("Exploring Operation:").strip())
        elif line.startswith("Moving to Node #"):
            if line.removeprefix("Moving to Node #") != just_generated:
                actions.append(line)
        if line.startswith("Generated Node #"):
            just_generated = line.removeprefix("Generated Node #").split(":")[0]
        elif not line.startswith("Moving to Node #"):
            just_generated = None
    return actions
