"""How an environment's observation becomes the policy's prompt, and its text an action.

One format per environment family. The same format serves SFT (a demonstration's prompt and
completion), evaluation and RL rollouts, so the policy always sees one layout.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StreamFormat:
    """Single-turn stream of search: the prompt is the problem's first state line; the policy
    writes the rest of the stream, and the action is the whole stream (prompt line included)."""

    def prompt(self, observation: str) -> str:
        return observation + "\n"

    def action(self, observation: str, completion: str) -> str:
        return observation + "\n" + completion

    def demo(self, demo: dict) -> tuple[str, str]:
        """(prompt text, completion text) of an env demonstration."""
        return self.prompt(demo["prompt"]), demo["completion"]


FORMATS = {"countdown": StreamFormat()}


def format_for(env_name: str):
    if env_name not in FORMATS:
        raise ValueError(f"no prompt/action format for env '{env_name}' yet; known: {sorted(FORMATS)}")
    return FORMATS[env_name]
