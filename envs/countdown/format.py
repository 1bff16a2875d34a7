"""How Countdown text becomes prompts and actions (see envs.base.Format for the six questions)."""
from __future__ import annotations

from dataclasses import dataclass

from ..base import Format


@dataclass(frozen=True)
class StreamFormat(Format):
    """Single-turn stream of search (env `countdown`): the prompt is the problem's first state
    line; the policy writes the rest of the stream, and the action is the whole stream (prompt
    line included)."""

    multi_turn = False
    stop_texts: tuple[str, ...] = ()

    def action(self, observation: str, completion: str) -> str:
        return observation + "\n" + completion

    def segments(self, demo: dict) -> list[tuple[str, bool]]:
        if "segments" in demo:  # a stream with a rejected move spliced in (demos.with_mistake)
            return [(text, bool(policy)) for text, policy in demo["segments"]]
        return super().segments(demo)


@dataclass(frozen=True)
class SearchLineFormat(StreamFormat):
    """Multi-turn Countdown search (env `countdown_search`): one line per turn.

    The conversation reads exactly like a stream of search: the policy writes the lines a
    searcher authors ("Exploring Operation: …" or "Moving to Node #…"), the env writes the rest
    (generated nodes, state lines, verdicts). So a policy trained on single-turn streams plays the
    multi-turn game as is, and its demonstrations are the same streams.
    """

    multi_turn = True
    stop_texts: tuple[str, ...] = ("\n",)

    def action(self, observation: str, completion: str) -> str:
        return completion.strip()

    def observation(self, observation: str, action: str, completion: str) -> str:
        # The env echoes an operation as its first line; the policy already wrote that line
        # (same text) — keep the echo only when it corrects what the policy wrote.
        first, _, rest = observation.partition("\n")
        if first.strip() == action and rest:
            return rest + "\n"
        return observation + "\n"
