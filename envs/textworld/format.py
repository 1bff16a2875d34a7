"""How TextWorld text becomes prompts and actions (see envs.base.Format for the six questions)."""
from __future__ import annotations

from dataclasses import dataclass

from ..base import Format

# What the policy writes before each command; demos (flatten_demo) put it there too.
ACTION_PREFIX = "> "


@dataclass(frozen=True)
class CommandFormat(Format):
    """Text games: the env's text, then one command line the policy writes as "> go north".
    Demonstrations are multi-turn walkthroughs {"turns": [{observation, action}]}. The "> " is
    the policy's own text (not the prompt's): a prompt ending in a space would tokenise
    differently from the same text seen whole."""

    lists_choices = True
    prefix: str = ACTION_PREFIX

    def action(self, observation: str, completion: str) -> str:
        line = completion.strip().splitlines()[0] if completion.strip() else ""
        return line.removeprefix(self.prefix.strip()).strip()

    def segments(self, demo: dict) -> list[tuple[str, bool]]:
        out: list[tuple[str, bool]] = []
        for turn in demo["turns"]:
            out.append((turn["observation"] + "\n", False))
            out.append((self.prefix + turn["action"] + "\n", turn.get("expert", True)))  # detours: context only
        return out

    def choices(self, info: dict) -> list[str] | None:
        """The admissible commands as the policy writes them ("> open chest\n"); None if none listed."""
        commands = info.get("admissible_actions")
        return [self.prefix + c + "\n" for c in commands] if commands else None
