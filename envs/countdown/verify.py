"""Checking Countdown answers: single operations, operation lists, and whole streams.

The legal moves are exactly the paper's combine() results, with free operand order for + and *:
  a+b, a*b                any order
  a-b                     a >= b (no negative numbers, as in the paper's larger-minus-smaller)
  a/b                     b != 0, a >= b and a % b == 0 (exact division of larger by smaller)
Numbers are consumed from a multiset (collections.Counter), so a number can be used only as
many times as it is available; the paper's checker never removed used numbers.
Nothing here raises on bad text: every failure becomes Verdict(ok=False, reason=...).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

# Numbers are ASCII digits, at most MAX_DIGITS of them (no legal move comes near: 100^4 has 9), so
# model text never reaches int()'s 4,300-digit limit and "٥" is no 5.
MAX_DIGITS = 12
NUM = rf"(?<![0-9])[0-9]{{1,{MAX_DIGITS}}}(?![0-9])"
OP_RE = re.compile(rf"^\s*({NUM})\s*([-+*/])\s*({NUM})\s*=\s*(-?{NUM})\s*$")
STATE_RE = re.compile(rf"Current State: ({NUM}):\[([^\]\n]*)\], Operations: \[([^\]\n]*)\]")
EXPLORE_RE = re.compile(r"Exploring Operation:\s*([^\n,]*)")
GOAL_RE = re.compile(rf"(-?{NUM}),(-?{NUM}) equal: Goal Reached")


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str
    operations: list[str] = field(default_factory=list)


def parse_operation(text: str) -> tuple[int, str, int, int] | None:
    """"66-42=24" -> (66, "-", 42, 24); None if it is not of that shape."""
    m = OP_RE.match(text)
    if m is None:
        return None
    return int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))


def true_result(a: int, op: str, b: int) -> tuple[int | None, str]:
    """(result, "") for a legal move, else (None, why it is not one)."""
    if op == "+":
        return a + b, ""
    if op == "*":
        return a * b, ""
    if op == "-":
        if a < b:
            return None, f"{a}-{b} would be negative: subtract the smaller number from the larger"
        return a - b, ""
    if op == "/":
        if b == 0:
            return None, f"{a}/{b} divides by zero"
        if a < b or a % b != 0:
            return None, f"{a}/{b} is not an exact division of the larger number by the smaller"
        return a // b, ""
    return None, f"unknown operator {op!r}"


def operation_error(a: int, op: str, b: int, claimed: int | None) -> str:
    """Why a?b=claimed is not a legal, correct move ("" if it is). claimed=None skips the check."""
    result, why = true_result(a, op, b)
    if result is None:
        return why
    if claimed is not None and claimed != result:
        return f"wrong arithmetic: {a}{op}{b} is {result}, not {claimed}"
    return ""


def _shown(op) -> str:
    """An operation as quoted in a verdict: model text, so cut to 80 characters."""
    text = repr(op)
    return text if len(text) <= 80 else text[:77] + "..."


def verify_solution(numbers: Sequence[int], target: int, ops: Sequence[str]) -> Verdict:
    """Check that `ops` turns `numbers` into exactly [target], each input used exactly once."""
    ops = list(ops)
    pool = Counter(numbers)
    for k, op in enumerate(ops, start=1):
        parsed = parse_operation(op) if isinstance(op, str) else None
        if parsed is None:
            return Verdict(False, f"operation {k} {_shown(op)} is not of the form a+b=c", ops)
        a, sym, b, claimed = parsed
        error = operation_error(a, sym, b, claimed)
        if error:
            return Verdict(False, f"operation {k} {_shown(op)}: {error}", ops)
        need = Counter([a, b])
        for n, count in need.items():
            if pool[n] < count:
                have = sorted(pool.elements())
                times = "twice" if count == 2 else "once"
                return Verdict(
                    False,
                    f"operation {k} {_shown(op)} needs {n} {times} but the numbers left are {have}",
                    ops,
                )
        pool -= need
        pool[claimed] += 1
    left = sorted(pool.elements())
    if len(left) != 1:
        return Verdict(False, f"numbers left unused: the operations end with {left}", ops)
    if left[0] != target:
        return Verdict(False, f"the operations end at {left[0]}, not the target {target}", ops)
    return Verdict(True, "valid solution", ops)


def _int_list(text: str) -> list[int] | None:
    parts = [p.strip() for p in text.split(",")] if text.strip() else []
    if not all(re.fullmatch(rf"-?{NUM}", p) for p in parts):
        return None
    return [int(p) for p in parts]


def _ops_list(text: str) -> list[str]:
    """The items of a printed list of strings, e.g. "'66-42=24', '61-14=47'" (never eval'd)."""
    quoted = re.findall(r"'([^']*)'|\"([^\"]*)\"", text)
    if quoted:
        return [single or double for single, double in quoted]
    return [p.strip() for p in text.split(",") if p.strip()]


def verify_stream(
    text: str, numbers: Sequence[int] | None = None, target: int | None = None
) -> Verdict:
    """Check a stream of search (or an optimal-path stream) that claims the goal.

    The problem comes from `numbers`/`target` if given, else from the first "Current State"
    line. The claimed solution is the Operations list of the last "Current State" before the
    first "Goal Reached" line, plus the last explored operation before it.
    """
    if not isinstance(text, str):
        return Verdict(False, f"the stream is not text but {type(text).__name__}")
    text = text.replace("<|endoftext|>", "")
    first = STATE_RE.search(text)
    if numbers is None or target is None:
        if first is None:
            return Verdict(False, "no 'Current State: T:[...], Operations: [...]' line to read "
                                  "the problem from")
        stream_nums = _int_list(first.group(2))
        if not stream_nums:
            return Verdict(False, f"cannot read the numbers in {first.group(0)!r}")
        numbers = stream_nums if numbers is None else numbers
        target = int(first.group(1)) if target is None else target
    elif first is not None and text.lstrip().startswith(first.group(0)):
        # The stream restates the problem: it must be the problem we were asked about.
        stream_nums = _int_list(first.group(2))
        if int(first.group(1)) != target or sorted(stream_nums or []) != sorted(numbers):
            return Verdict(False, f"the stream starts from {first.group(1)}:[{first.group(2)}] "
                                  f"but the problem is {target}:{list(numbers)}")

    goal = GOAL_RE.search(text)
    if goal is None:
        return Verdict(False, "no 'equal: Goal Reached' line")
    if goal.group(1) != goal.group(2):
        return Verdict(False, f"the goal line claims {goal.group(1)} equals {goal.group(2)}")
    if int(goal.group(2)) != target:
        return Verdict(False, f"the goal line names {goal.group(2)} but the target is {target}")
    before = text[: goal.start()]
    explored = EXPLORE_RE.findall(before)
    if not explored:
        return Verdict(False, "no 'Exploring Operation' line before the goal")
    states = STATE_RE.findall(before)
    ops = (_ops_list(states[-1][2]) if states else []) + [explored[-1].strip()]
    return verify_solution(numbers, target, ops)
