"""The `alfworld` environment: play one ALFWorld game (.tw-pddl) as ALFWorld's text world does.

The game runs in textworld's PDDL backend under ALFWorld's AlfredDemangler and AlfredInfos
wrappers (generate.start_game), so entities read "apple 1", "cabinet 3" and the admissible
commands are the game's own.

Observations: reset gives ALFWorld's intro without its "-= Welcome to TextWorld, ALFRED! =-"
banner (the same line in every game): what the agent sees around it, then "Your task is to:
...". A step gives the game's reply. With admissible_commands, a last line "Admissible commands:
a, b, c" follows (info["admissible_actions"] always holds them, less "help", whose reply is the
manual, not a move).

The action is one command: the first non-empty line of the text (a leading "> " dropped), in
lower case with single spaces, as ALFWorld's commands are written. A command the game does not
understand gets the game's own reply, "Nothing happens.", and the episode goes on. The episode
ends when the game is won (this backend has no losing state) or after max_turns.

Rewards (reward_density): sparse pays 1.0 on the winning step. dense pays a telescoping potential
1 - (planner's remaining plan length) / (its length at the start), clipped at 0 and 1.0 once won:
each step pays the change in potential, so an episode sums to at most 1 (to exactly 1.0 when won)
and a detour that lengthens the plan costs what it undoes. The planner (config `planner`: the
exact expert of expert.py, about a millisecond, or fast-downward's blind search, from 0.1 s to a
minute or more in a big kitchen) is asked only off the task's expert plan and after commands that
can change what is left (see _plan_left), from the game's current PDDL state.
info["reward_components"]: `progress` (what dense pays this step), `plan_left` (the planner's
remaining steps, -1 when it finds none; dense only) and `goal`.
"""

from __future__ import annotations

import re

from ..base import make_info, quantize
from ..textworld.env import ADMISSIBLE_PREFIX, GameFileEnv, command_from_action
from .config import AlfWorldConfig
from .generate import plan_from_here, start_game
from .tasks import AlfWorldTasks

BANNER_RE = re.compile(r"^\s*-= Welcome to TextWorld, ALFRED! =-\s*")
NOT_MOVES = frozenset({"help"})
# Commands whose PDDL actions (look, inventory, examine*, help) only mark things as seen: no goal
# or precondition reads that, so the planner's remaining plan cannot change.
LOOKING_VERBS = frozenset({"look", "inventory", "examine", "help"})


def normalize_command(action) -> str:
    """The command a policy's text stands for, written as ALFWorld's commands are."""
    return " ".join(command_from_action(action).lower().split())


class AlfWorldEnv(GameFileEnv):
    """One ALFWorld game per episode: reset(options={"task": task}) with a task dict from
    AlfWorldTasks (or any {"game": path to a .tw-pddl}); without a task, a train game is drawn."""

    name = "alfworld"

    def __init__(self, config: AlfWorldConfig):
        super().__init__(config)
        self.dense = config.reward_density == "dense"
        self.max_turns = config.max_turns

    def _load_game(self, path: str):
        return start_game(path, self.config.planner)

    def _task_source(self):
        return AlfWorldTasks(self.config)

    def _admissible(self, state) -> list[str]:
        return [c for c in (state.admissible_commands or []) if c not in NOT_MOVES]

    def _with_commands(self, text: str, state) -> str:
        if not self.config.admissible_commands:
            return text
        return f"{text}\n\n{ADMISSIBLE_PREFIX}{', '.join(self._admissible(state))}"

    def expert_plan(self) -> list[str]:
        """The commands that win from the current state (the game's planner, asked now; empty
        once won, or when it finds no plan)."""
        if self._state is None or self._game is None:
            raise RuntimeError("expert_plan() before reset()")
        if self._state.won:
            return []
        if self._plan is None:
            self._plan = plan_from_here(self._game, self.config.planner)
        return list(self._plan)

    def _plan_left(self, command: str, admissible_before: list[str]) -> int | None:
        """The planner's remaining plan length after `command` (None: it finds no plan). The
        planner is asked only off the task's expert plan and only when the command can have
        changed what is left to do (fast-downward: from 0.1 s to tens of seconds in a kitchen)."""
        if self._state.won:
            return 0
        if command not in admissible_before or command.split()[0] in LOOKING_VERBS:
            return self._left  # "Nothing happens.", or only looked: the same state for the plan
        walkthrough = self.task.get("walkthrough") or []
        if self._on_plan and self._done < len(walkthrough) and command == walkthrough[self._done]:
            self._done += 1  # the rest of an optimal plan is an optimal plan from here
            return len(walkthrough) - self._done
        self._on_plan = False
        return len(self.expert_plan()) or None

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.task = task = self._task_of(options)
        state = self._start(task["game"])
        self._state, self.turns, self._paid, self._over, self._plan = state, 0, 0.0, False, None
        self._on_plan, self._done = True, 0  # following the task's expert plan; its steps taken
        if self.dense:  # the planner's steps left
            self._left = len(task.get("walkthrough") or []) or len(self.expert_plan()) or None
        else:
            self._left = None
        self._plan_at_start = max(self._left or 0, 1) if self.dense else None
        text = BANNER_RE.sub("", state.feedback or "").strip()
        info = make_info(False, {}, self._admissible(state), turn=0, max_turns=self.max_turns,
                         task_id=task.get("id"), task_type=task.get("task_type"), score=0, max_score=1)
        return self._with_commands(text, state), info

    def step(self, action: str):
        if self._over or self._game is None:
            raise RuntimeError("the episode is over (or never started): call reset()")
        command = normalize_command(action)
        self.turns += 1
        admissible_before = self._state.admissible_commands or []
        try:
            state, _, _ = self._game.step(command)
            self._state, self._plan = state, None
            left = self._plan_left(command, admissible_before) if self.dense else None
        except Exception as e:  # the game engine (or its planner) broke: not the policy's fault
            return self._infra_error(command, e)
        self._left = left
        won = bool(state.won)
        components = {"goal": float(won)}
        if self.dense:
            if won:
                potential = 1.0
            elif left is None:  # no plan from here (the planner gave up): no progress
                potential = 0.0
            else:
                potential = max(quantize(1.0 - left / self._plan_at_start), 0.0)
            components.update(plan_left=float(left if left is not None else -1))
        else:
            potential = 1.0 if won else 0.0
        progress, self._paid = potential - self._paid, potential
        components["progress"] = progress
        reward = progress if self.dense else float(won)
        truncated = not won and self.turns >= self.max_turns
        self._over = won or truncated
        text = (state.feedback or "").strip()
        info = make_info(won, components, [] if won else self._admissible(state), turn=self.turns,
                         max_turns=self.max_turns, command=command, score=int(won), max_score=1)
        return (text if won else self._with_commands(text, state)), float(reward), won, truncated, info

    def _infra_error(self, command: str, error: Exception):
        self._over = True
        self._close_game()
        info = make_info(False, {}, [], turn=self.turns, max_turns=self.max_turns, command=command,
                         error=f"{type(error).__name__}: {error}", score=0, max_score=1)
        info["infra_error"] = True
        return "", 0.0, False, True, info
