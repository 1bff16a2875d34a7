"""The `swe` env's tool-call syntax, its parser, and its Format (see envs.base.Format).

One tool call per turn. The first line is the tool and its arguments (split like a shell line:
quote an argument that holds spaces); the lines after it, up to the end of the call, are its
body (only str_replace, insert and bash read one). Every call ends with a form feed, END
("\\f"), the format's one stop text: the byte-level tokenizer always has it as a token, and it
does not occur in the code a body carries.

    view <path> [start end]        a file's numbered lines (start..end, 1-based, inclusive), or a
                                   folder's entries
    search <pattern> [path]        grep -rnI for the (basic) regex pattern, in path (default .)
    str_replace <path>             replace the text of the old lines, which must occur exactly once,
    <old lines>                    with the text of the new lines (none: delete them)
    <new>
    <new lines>
    insert <path> <line>           insert the body's lines after line <line> (0: at the top)
    <lines>
    undo_edit <path>               undo the last str_replace/insert of path
    run_tests [test ids or paths]  pytest (default: the instance's tests), outcomes and failures
    bash <command>                 a shell command in the repository (sandboxed; or the body's
                                   lines as a script)
    submit                         grade the repository as it stands; the episode ends

For example (the policy writes everything after "issue text..." and the replies come between):

    str_replace toolz/itertoolz.py
        return a - b
    <new>
        return a + b
    \\f

A line that is only "<old>" may open a str_replace body. A call the parser cannot read gets an
error reply (what is wrong, and the syntax) and the episode goes on.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

from ..base import Format

END = "\f"
NEW_MARK = "<new>"
OLD_MARK = "<old>"
TOOLS = ("view", "search", "str_replace", "insert", "undo_edit", "run_tests", "bash", "submit")

SYNTAX = {
    "view": "view <path> [start end]",
    "search": "search <pattern> [path]",
    "str_replace": "str_replace <path>, then the old lines, a line <new>, the new lines",
    "insert": "insert <path> <line>, then the lines to insert after that line (0: at the top)",
    "undo_edit": "undo_edit <path>",
    "run_tests": "run_tests [test ids or paths]",
    "bash": "bash <command> (or the command's lines below the first line)",
    "submit": "submit",
}

TOOLS_HELP = (
    "Tools (one call per turn; the first line is the tool and its arguments, then any body lines; "
    "end the call with a form feed):\n" + "\n".join(f"  {SYNTAX[t]}" for t in TOOLS)
)


class ParseError(ValueError):
    """A tool call the parser cannot read; the message is the env's reply."""


@dataclass(frozen=True)
class Call:
    tool: str
    args: list[str] = field(default_factory=list)
    body: str | None = None  # the lines after the first, joined by "\n" (None: no body lines)
    new: str | None = None  # str_replace: the new text


def parse_call(text: str) -> Call:
    """The call that text stands for (the text up to END; surrounding blank lines ignored)."""
    text = text.split(END, 1)[0].replace("\r\n", "\n")
    lines = text.split("\n")
    while lines and not lines[0].strip():
        lines.pop(0)
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise ParseError(f"empty call; write one of: {', '.join(TOOLS)}")
    head, body_lines = lines[0], lines[1:]
    try:
        words = shlex.split(head)
    except ValueError as e:
        raise ParseError(f"cannot split the first line ({e})") from None
    tool, args = words[0], words[1:]
    if tool not in TOOLS:
        raise ParseError(f"unknown tool {tool!r}; tools: {', '.join(TOOLS)}")
    body = "\n".join(body_lines) if body_lines else None

    def need(lo: int, hi: int) -> None:
        if not lo <= len(args) <= hi:
            raise ParseError(f"{tool} takes {lo if lo == hi else f'{lo} to {hi}'} argument(s), got {len(args)}; "
                             f"syntax: {SYNTAX[tool]}")

    if tool == "bash":
        command = head.split(None, 1)[1] if len(head.split(None, 1)) > 1 else ""
        script = "\n".join(x for x in (command, body or "") if x.strip())
        if not script.strip():
            raise ParseError(f"bash needs a command; syntax: {SYNTAX['bash']}")
        return Call("bash", [], script)
    if tool == "view":
        need(1, 3)
        if len(args) == 2:
            raise ParseError(f"view takes a path, or a path, a start and an end line; syntax: {SYNTAX['view']}")
        if len(args) == 3 and not all(a.isdigit() for a in args[1:]):
            raise ParseError(f"view: start and end must be line numbers; syntax: {SYNTAX['view']}")
    elif tool == "search":
        need(1, 2)
    elif tool in ("undo_edit",):
        need(1, 1)
    elif tool == "submit":
        need(0, 0)
    elif tool == "insert":
        need(2, 2)
        if not args[1].isdigit():
            raise ParseError(f"insert: the line must be a number; syntax: {SYNTAX['insert']}")
        if body is None:
            raise ParseError(f"insert needs the lines to insert below its first line; syntax: {SYNTAX['insert']}")
    elif tool == "str_replace":
        need(1, 1)
        if body_lines and body_lines[0].strip() == OLD_MARK:
            body_lines = body_lines[1:]
        marks = [i for i, line in enumerate(body_lines) if line.strip() == NEW_MARK]
        if len(marks) != 1:
            raise ParseError(f"str_replace needs exactly one line {NEW_MARK} between the old and the new lines "
                             f"(found {len(marks)}); syntax: {SYNTAX['str_replace']}")
        old, new = body_lines[: marks[0]], body_lines[marks[0] + 1:]
        if not "".join(old).strip():
            raise ParseError("str_replace: the old lines are empty; to add lines use insert")
        return Call(tool, args, "\n".join(old), "\n".join(new))
    return Call(tool, args, body)


def call_text(tool: str, *args: str | int, body: str | None = None, new: str | None = None) -> str:
    """The text of a call as the policy writes it (END included): what the demos hold."""
    head = " ".join([tool, *(shlex.quote(str(a)) for a in args)])
    lines = [head]
    if tool == "str_replace":
        lines += [body or "", NEW_MARK] + ([new] if new else [])
    elif body is not None:
        lines.append(body)
    return "\n".join(lines) + "\n" + END


@dataclass(frozen=True)
class ToolFormat(Format):
    """The issue (and the tool list) as the first prompt; each turn the policy writes one tool call
    ending in END; the env's reply follows on its own lines. Demonstrations are multi-turn:
    {"turns": [{"observation", "action", "expert"?}, ...]}, `action` the call's text as call_text
    writes it; a detour's turns ({"expert": False}) are in the context, not trained on."""

    stop_texts: tuple[str, ...] = (END,)

    def action(self, observation: str, completion: str) -> str:
        return completion.split(END, 1)[0].strip("\n")

    def observation(self, observation: str, action: str, completion: str) -> str:
        return "\n" + observation + "\n"

    def segments(self, demo: dict) -> list[tuple[str, bool]]:
        out: list[tuple[str, bool]] = []
        for i, turn in enumerate(demo["turns"]):
            obs = turn["observation"]
            out.append((self.prompt(obs) if i == 0 else self.observation(obs, "", ""), False))
            text = turn["action"] if turn["action"].endswith(END) else turn["action"] + "\n" + END
            out.append((text, turn.get("expert", True)))
        return out
