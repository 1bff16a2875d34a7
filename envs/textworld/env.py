"""The `textworld` environment: play one generated (or user-brought) TextWorld game.

Observations (plain text, the game's own words, cleaned of its prompt/status line, of the
indentation Inform uses to centre text, and of the end-of-game offer to RESTART/RESTORE/UNDO):

  reset   the objective, the room description and the inventory, each a paragraph
  step    the game's reply to the command; then, when configured, the objective again
          (show_objective), the room description (show_description) and the inventory
          (show_inventory)
  both    a last line "Admissible commands: a, b, c" when admissible_commands is true
          (info["admissible_actions"] always holds them)

The action is one command: the first non-empty line of the text, stripped (a leading "> " too). A command the game
does not understand gets the game's own reply ("That's not a verb I recognise.") and the episode
goes on. Commands that would restart, save, restore, undo or quit the game (and so break score
tracking) are not sent to the game; they get BLOCKED_REPLY and cost a turn.

Rewards (reward_density): sparse pays 1.0 on the winning step. dense pays each step's score
gain divided by max_score, and on the winning step the remainder up to 1.0, so a won episode
sums to exactly 1.0 and any episode to at most 1.0. info["reward_components"]: `score` (points
gained this step), `intermediate` (textworld's +1/0/-1: closer to / as far from / further from
a win), `progress` (what dense pays this step) and `goal` (1.0 on the win).
"""

from __future__ import annotations

import os
import re
from typing import Any

from ..base import TRAIN_SPLIT, TextEnv, make_info, quantize
from .config import TextWorldConfig
from .generate import import_textworld, quiet_jericho
from .tasks import TextWorldTasks

BLOCKED_COMMANDS = frozenset(
    {"restart", "restore", "save", "quit", "q", "undo", "script", "unscript", "transcript",
     "noscript"}
)
BLOCKED_REPLY = "That command is not available in this game."
ADMISSIBLE_PREFIX = "Admissible commands: "

_PROMPT_LINE_RE = re.compile(r"\n>[^\n]*\Z")
_BLANK_RUNS_RE = re.compile(r"\n{3,}")
# After a win or loss Inform offers to restart; those commands are blocked, so drop the offer.
_END_OFFER_RE = re.compile(r"^Would you like to RESTART.*$", re.MULTILINE)


def clean_text(text: str | None) -> str:
    """The game's text without its trailing '>' prompt / status line, without the spaces Inform
    centres lines with, and with at most one blank line in a row."""
    text = _PROMPT_LINE_RE.sub("", (text or "").rstrip())
    if text.startswith(">"):
        text = text[1:]
    text = _END_OFFER_RE.sub("", text)
    lines = [line.strip() for line in text.splitlines()]
    return _BLANK_RUNS_RE.sub("\n\n", "\n".join(lines)).strip()


# The Z-machine interpreter crashes the whole process on some control characters (a policy's
# raw bytes included), and parses only printable ASCII anyway. A backslash starts one of the
# interpreter's own escape commands ("\q", "\x", "\help": the process exits), so it goes too.
_PRINTABLE = re.compile(r"[^\x20-\x5b\x5d-\x7e]+")
MAX_COMMAND_CHARS = 200


def command_from_action(action: Any) -> str:
    """The command a policy's text stands for: its first non-empty line, stripped (and without
    a leading "> ", the prompt that demos put before actions), printable ASCII only."""
    text = action if isinstance(action, str) else str(action)
    for line in text.splitlines():
        command = _PRINTABLE.sub(" ", line).strip().lstrip(">").strip()
        if command:
            return command[:MAX_COMMAND_CHARS]
    return ""


def _is_blocked(command: str) -> bool:
    words = command.lower().strip(" .!").split()
    return bool(words) and words[0] in BLOCKED_COMMANDS


def _request_infos(tw, expert: bool = False):
    return tw.EnvInfos(
        feedback=True, description=True, inventory=True, objective=True, admissible_commands=True,
        intermediate_reward=True, won=True, lost=True, score=True, max_score=True,
        policy_commands=expert,  # the game's own planner: the commands that win from here
    )


class GameFileEnv(TextEnv):
    """A text env that plays one game file per episode (TextWorld's .z8, ALFWorld's .tw-pddl): the
    loaded game is kept across resets of the same file (loading one costs ~0.3 s), and reset()
    without a task draws a train game. Subclasses say how a file is loaded and where tasks come from."""

    name = "game"  # the env's name in error messages

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.task: dict | None = None
        self._tasks = None  # built only if reset() has to draw a task
        self._game = None  # the textworld env of the loaded game (kept across resets)
        self._game_path: str | None = None
        self._state = None
        self._over = True

    def _load_game(self, path: str):
        """A fresh textworld env (not yet reset) playing the game file at `path`."""
        raise NotImplementedError

    def _task_source(self):
        """The TaskSource whose train split reset() draws from when given no task."""
        raise NotImplementedError

    def _start(self, path: str):
        if self._game is None or self._game_path != path:
            self._close_game()
            self._game = self._load_game(path)
            self._game_path = path
        return self._game.reset()

    def _close_game(self) -> None:
        if self._game is not None:
            try:
                self._game.close()
            finally:
                self._game, self._game_path = None, None

    def close(self) -> None:
        self._close_game()
        super().close()

    def _task_of(self, options: dict | None) -> dict:
        """reset()'s task: options["task"] (a task dict, or a game path), else a drawn train game."""
        task = (options or {}).get("task")
        if task is None:
            task = self._draw_task()
        elif isinstance(task, str):
            task = {"game": task}
        if not isinstance(task, dict) or not isinstance(task.get("game"), str):
            raise ValueError(f"options['task'] must be a task dict with a 'game' path, got {task!r}")
        if not os.path.isfile(task["game"]):
            raise FileNotFoundError(f"{self.name} game {task['game']!r} does not exist "
                                    "(generate the split again, or fix the task's 'game' path)")
        return task

    def _draw_task(self) -> dict:
        if self._tasks is None:
            self._tasks = self._task_source()
        train = self._tasks.tasks(TRAIN_SPLIT)
        if not train:
            raise ValueError(f"{self.name}: no task given and the train split is empty (train_size=0)")
        return train[int(self.np_random.integers(len(train)))]


class TextWorldEnv(GameFileEnv):
    """One TextWorld game per episode: reset(options={"task": task}) with a task dict from
    TextWorldTasks (or any {"game": path to a .z8}); without a task, a train game is drawn."""

    name = "textworld"

    def __init__(self, config: TextWorldConfig, expert: bool = False):
        super().__init__(config)
        self.expert = expert  # ask the game for expert_plan() after every step (demos only)
        self.max_turns = config.turn_limit

    # -- game handling ------------------------------------------------------------------------

    def _load_game(self, path: str):
        tw = import_textworld()
        with quiet_jericho():
            return tw.start(path, _request_infos(tw, self.expert))

    def _task_source(self):
        return TextWorldTasks(self.config)

    # -- observations -------------------------------------------------------------------------

    def _admissible(self, state) -> list[str]:
        commands = list(getattr(state, "admissible_commands", None) or [])
        return [c for c in commands if not _is_blocked(c)]

    def _extras(self, state, objective: bool, description: bool, inventory: bool) -> list[str]:
        parts = []
        if objective and clean_text(state.objective):
            parts.append(clean_text(state.objective))
        if description and clean_text(state.description):
            parts.append(clean_text(state.description))
        if inventory and clean_text(state.inventory):
            parts.append(clean_text(state.inventory))
        if self.config.admissible_commands:
            parts.append(ADMISSIBLE_PREFIX + ", ".join(self._admissible(state)))
        return parts

    def expert_plan(self) -> list[str]:
        """The commands that win the game from the current state (the game's planner; empty once
        it is won or lost). Only for an env built with expert=True."""
        if not self.expert:
            raise RuntimeError("expert_plan() needs TextWorldEnv(config, expert=True)")
        if self._state is None:
            raise RuntimeError("expert_plan() before reset()")
        return list(self._state.policy_commands or [])

    # -- gymnasium API ------------------------------------------------------------------------

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.task = task = self._task_of(options)
        state = self._start(task["game"])
        self._state = state
        self.turns = 0
        self._score = int(state.score or 0)
        self._max_score = int(state.max_score or 0)
        self._paid = 0.0
        self._over = False
        parts = self._extras(state, objective=True, description=True, inventory=True)
        info = make_info(
            False, {}, self._admissible(state), lost=False, score=self._score,
            max_score=self._max_score, intermediate_reward=0.0, turn=0, max_turns=self.max_turns,
            task_id=task.get("id"), objective=clean_text(state.objective),
        )
        return "\n\n".join(parts), info

    def step(self, action: str):
        if self._over or self._game is None:
            raise RuntimeError("the episode is over (or never started): call reset()")
        command = command_from_action(action)
        self.turns += 1
        blocked = _is_blocked(command)
        if blocked:
            state, feedback, intermediate = self._state, BLOCKED_REPLY, 0.0
        else:
            try:
                state, _, done = self._game.step(command)
            except Exception as e:  # the game engine broke: not the policy's fault
                return self._infra_error(command, e)
            feedback, intermediate = clean_text(state.feedback), float(state.intermediate_reward or 0)
        self._state = state
        won, lost = bool(state.won), bool(state.lost) and not state.won
        score = int(state.score or 0)
        delta, self._score = score - self._score, score
        # Dense progress: the potential is the share of max_score reached; the win tops it up.
        if won:
            potential = 1.0
        elif self._max_score > 0:
            potential = min(quantize(score / self._max_score), 1.0)
        else:
            potential = self._paid
        progress = potential - self._paid
        self._paid = potential
        reward = progress if self.config.reward_density == "dense" else float(won)
        terminated = won or lost
        truncated = not terminated and self.turns >= self.max_turns
        self._over = terminated or truncated
        parts = [feedback]
        if not terminated:
            parts += self._extras(state, self.config.show_objective, self.config.show_description,
                                  self.config.show_inventory)
        info = make_info(
            won,
            {"score": delta, "intermediate": intermediate, "progress": progress,
             "goal": float(won)},
            [] if terminated else self._admissible(state),
            lost=lost, score=score, max_score=self._max_score, intermediate_reward=intermediate,
            turn=self.turns, max_turns=self.max_turns, command=command, blocked=blocked,
        )
        return "\n\n".join(p for p in parts if p), float(reward), terminated, truncated, info

    def _infra_error(self, command: str, error: Exception):
        self._over = True
        self._close_game()
        info = make_info(False, {}, [], lost=False, score=self._score, max_score=self._max_score,
                         intermediate_reward=0.0, turn=self.turns, max_turns=self.max_turns,
                         command=command, blocked=False, error=f"{type(error).__name__}: {error}")
        info["infra_error"] = True
        return "", 0.0, False, True, info
