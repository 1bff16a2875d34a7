"""How an environment's observation becomes the policy's prompt, and its text an action.

One format per environment family. The same format serves SFT (a demonstration as text
segments), evaluation and RL rollouts, so the policy always sees one layout — and, because SFT
tokenises each segment on its own exactly as the episode runner does turn by turn, the same
token ids.

A format answers six questions:
    prompt(obs)                      the text of the first prompt (after <bos>)
    stop_texts                       where a turn's generation ends (() = only at <eos>)
    action(obs, completion)          the text handed to env.step
    observation(obs, action, text)   the text appended to the conversation after env.step
    segments(demo)                   a demonstration as [(text, written_by_policy), ...]
    choices(info)                    the texts the policy may write next, when the env lists its
                                     actions (rollout.constrain_actions); else None
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StreamFormat:
    """Single-turn stream of search: the prompt is the problem's first state line; the policy
    writes the rest of the stream, and the action is the whole stream (prompt line included)."""

    multi_turn = False
    lists_choices = False
    stop_texts: tuple[str, ...] = ()

    def prompt(self, observation: str) -> str:
        return observation + "\n"

    def action(self, observation: str, completion: str) -> str:
        return observation + "\n" + completion

    def observation(self, observation: str, action: str, completion: str) -> str:
        return observation + "\n"  # never reached in play: the episode has one turn

    def segments(self, demo: dict) -> list[tuple[str, bool]]:
        if "segments" in demo:  # a stream with a rejected move spliced in (countdown demos)
            return [(text, bool(policy)) for text, policy in demo["segments"]]
        return [(self.prompt(demo["prompt"]), False), (demo["completion"], True)]

    def choices(self, info: dict) -> list[str] | None:
        return None


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


@dataclass(frozen=True)
class CommandFormat:
    """Text games (TextWorld): the env's text, then one command line the policy writes as
    "> go north". Demonstrations are multi-turn walkthroughs {"turns": [{observation, action}]}.
    The "> " is the policy's own text (not the prompt's): a prompt ending in a space would
    tokenise differently from the same text seen whole."""

    multi_turn = True
    lists_choices = True
    stop_texts: tuple[str, ...] = ("\n",)
    prefix: str = "> "

    def prompt(self, observation: str) -> str:
        return observation + "\n"

    def action(self, observation: str, completion: str) -> str:
        line = completion.strip().splitlines()[0] if completion.strip() else ""
        return line.removeprefix(self.prefix.strip()).strip()

    def observation(self, observation: str, action: str, completion: str) -> str:
        return observation + "\n"

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


FORMATS = {"countdown": StreamFormat(), "countdown_search": SearchLineFormat(), "textworld": CommandFormat()}


def format_for(env_name: str):
    if env_name not in FORMATS:
        raise ValueError(f"no prompt/action format for env '{env_name}' yet; known: {sorted(FORMATS)}")
    return FORMATS[env_name]
