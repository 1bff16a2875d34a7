"""Countdown arithmetic, an exhaustive solver, and the Stream-of-Search writers.

The stream format and the DFS/BFS behaviour follow the Stream of Search paper's code
(Gandhi et al. 2024), with fixes that are called out where they happen:
  - BFS tests the child's own numbers for a dead end (the paper tested another node of the
    same size, so output is unchanged) and does not push finished leaves back onto its heap
    (the paper did, which only added "Current State: T:[n]" lines with reused node ids);
  - optimal_stream removes used numbers as a multiset (the paper dropped every copy of a value).
Both searches end with "No solution found." when they exhaust without reaching the goal.
"""

from __future__ import annotations

import heapq
import itertools
import random
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Callable, Sequence

from .verify import parse_operation

if TYPE_CHECKING:
    from .problems import Problem

Heuristic = Callable[[Sequence[int], int], float]


# ---------------------------------------------------------------------------------------------
# Arithmetic


def combine(a: int, b: int) -> list[tuple[int, str]]:
    """All (result, "a?b=r") moves on the pair (a, b), in the paper's order.

    Always a+b and a*b (operands in pair order); then larger-smaller, and larger/smaller when
    the division is exact and the divisor is not 0.
    """
    moves = [(a + b, f"{a}+{b}={a + b}"), (a * b, f"{a}*{b}={a * b}")]
    big, small = (b, a) if a <= b else (a, b)
    moves.append((big - small, f"{big}-{small}={big - small}"))
    if small != 0 and big % small == 0:
        moves.append((big // small, f"{big}/{small}={big // small}"))
    return moves


def _values(a: int, b: int) -> list[int]:
    """The results of combine(a, b) without the strings (the solver's hot loop)."""
    big, small = (b, a) if a <= b else (a, b)
    out = [a + b, a * b, big - small]
    if small != 0 and big % small == 0:
        out.append(big // small)
    return out


def apply_numbers(nums: Sequence[int], i: int, j: int, result: int) -> list[int]:
    """Numbers left after combining positions i and j: the rest in order, then the result."""
    return [n for k, n in enumerate(nums) if k != i and k != j] + [result]


@lru_cache(maxsize=None)
def _splits(n: int) -> tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]:
    """Each unordered split of positions 0..n-1 into two non-empty parts, once: the part
    holding position 0 comes first."""
    out = []
    for mask in range((1 << (n - 1)) - 1):
        left = (0,) + tuple(k + 1 for k in range(n - 1) if mask >> k & 1)
        right = tuple(k + 1 for k in range(n - 1) if not mask >> k & 1)
        out.append((left, right))
    return tuple(out)


@lru_cache(maxsize=1 << 18)
def reachable(nums: tuple[int, ...]) -> frozenset[int]:
    """Every value that combining all of `nums` (a sorted tuple) can end with.

    Any order of pairwise moves is a binary tree over the multiset, so the values are the union
    over two-part splits {L, R} of combine(reachable(L), reachable(R)). Keys are sorted
    sub-multisets of the inputs, so the cache is shared across problems.
    """
    if len(nums) == 1:
        return frozenset(nums)
    if len(nums) == 2:
        return frozenset(_values(nums[0], nums[1]))
    out: set[int] = set()
    for left, right in _splits(len(nums)):
        right_vals = reachable(tuple(nums[k] for k in right))
        for a in reachable(tuple(nums[k] for k in left)):
            for b in right_vals:
                out.update(_values(a, b))
    return frozenset(out)


def _partners(a: int, target: int) -> set[int]:
    """Every b for which some move on (a, b) might give target (checked forward afterwards)."""
    cands = {target - a, a + target, a - target, a * target}
    if a != 0 and target % a == 0:
        cands.add(target // a)
    if target != 0 and a % target == 0:
        cands.add(a // target)
    return cands


def can_reach(nums: Sequence[int], target: int) -> bool:
    """True if combining all of `nums` can give exactly `target` (exhaustive, memoised).

    Rather than building the full value set of `nums`, it walks the smaller side of each split
    and looks up the few partner values that could hit the target on the other side.
    """
    n = len(nums)
    if n == 1:
        return nums[0] == target
    if n == 2:
        return target in _values(nums[0], nums[1])
    if n == 3:  # the solver's most common call: cheaper to enumerate than to cache
        x, y, z = nums
        for single, a, b in ((x, y, z), (y, x, z), (z, x, y)):
            for v in _values(a, b):
                if target in _values(single, v):
                    return True
        return False
    key = tuple(sorted(nums))
    for left, right in _splits(n):
        left_vals = reachable(tuple(key[k] for k in left))
        right_vals = reachable(tuple(key[k] for k in right))
        if len(left_vals) > len(right_vals):
            left_vals, right_vals = right_vals, left_vals
        for a in left_vals:
            if a == 0 and target == 0:
                return True  # 0 * anything
            for b in _partners(a, target):
                if b in right_vals and target in _values(a, b):
                    return True
    return False


def solve(numbers: Sequence[int], target: int) -> list[str] | None:
    """One solution as a list of operation strings, or None if there is none.

    It is the first solution of the paper's exhaustive DFS (pairs in itertools.combinations
    order, moves in combine() order); the can_reach oracle just skips the failing subtrees.
    """
    nums = list(numbers)
    if not nums or not can_reach(nums, target):
        return None
    ops: list[str] = []
    while len(nums) > 1:
        for (i, j), (result, op) in _moves(nums):
            after = apply_numbers(nums, i, j, result)
            if can_reach(after, target):
                nums, ops = after, ops + [op]
                break
    return ops


def _moves(nums: Sequence[int]):
    """(pair, move) for every pair of positions and every move on it, in the paper's order."""
    for i, j in itertools.combinations(range(len(nums)), 2):
        for move in combine(nums[i], nums[j]):
            yield (i, j), move


# ---------------------------------------------------------------------------------------------
# Heuristics (lower is better)


def sum_heuristic(nums: Sequence[int], target: int) -> float:
    """Mean distance of the numbers to the target."""
    if len(nums) == 1:
        return abs(nums[0] - target)
    return sum(abs(n - target) for n in nums) / len(nums)


@lru_cache(maxsize=4096)
def _factors(target: int) -> tuple[int, ...]:
    # Targets 0 and 1 have no factor in 2..target; fall back to the target itself.
    return tuple(i for i in range(2, target + 1) if target % i == 0) or (target,)


def mult_heuristic(nums: Sequence[int], target: int) -> float:
    """"Factor distance": summed distance of each number to its nearest factor of the target."""
    factors = _factors(target)
    return sum(min(abs(n - f) for f in factors) for n in nums)


HEURISTICS: dict[str, Heuristic] = {"sum": sum_heuristic, "mult": mult_heuristic}


def _heuristic(h: str | Heuristic) -> Heuristic:
    if callable(h):
        return h
    if h not in HEURISTICS:
        raise ValueError(f"unknown heuristic {h!r}; choose from {sorted(HEURISTICS)}")
    return HEURISTICS[h]


# ---------------------------------------------------------------------------------------------
# Stream writers


def state_line(target: int, nums: Sequence[int], ops: Sequence[str]) -> str:
    return f"Current State: {target}:{list(nums)}, Operations: {list(ops)}"


def explore_line(op: str, nums: Sequence[int]) -> str:
    return f"Exploring Operation: {op}, Resulting Numbers: {list(nums)}"


def leaf_line(value: int, target: int) -> str:
    """The line after a move that leaves one number: goal or dead end."""
    if value == target:
        return f"{value},{target} equal: Goal Reached"
    return f"{value},{target} unequal: No Solution"


def generated_line(idx: str, target: int, nums: Sequence[int], op: str) -> str:
    return f"Generated Node #{idx}: {target}:{list(nums)} Operation: {op}"


NO_SOLUTION = "No solution found."


class _Node:
    """A search node. Compares by heuristic only, like the paper's, so heap ties break the same."""

    __slots__ = ("nums", "ops", "h", "idx")

    def __init__(self, nums: list[int], ops: list[str], h: float, idx: str = "0"):
        self.nums, self.ops, self.h, self.idx = nums, ops, h, idx

    def __lt__(self, other: "_Node") -> bool:
        return self.h < other.h


def _children(node: _Node, target: int, heuristic: Heuristic) -> list[_Node]:
    out = []
    for (i, j), (result, op) in _moves(node.nums):
        nums = apply_numbers(node.nums, i, j, result)
        out.append(_Node(nums, node.ops + [op], heuristic(nums, target)))
    return out


def dfs_stream(
    numbers: Sequence[int],
    target: int,
    heuristic: str | Heuristic = "sum",
    threshold: float | None = None,
) -> str:
    """The paper's heuristic DFS as a stream. Children scoring above `threshold` (default: the
    target, as in the paper's data) are pruned; the rest are tried best-first (stable sort)."""
    h = _heuristic(heuristic)
    threshold = target if threshold is None else threshold
    lines: list[str] = []

    def visit(node: _Node) -> bool:
        lines.append(state_line(target, node.nums, node.ops))
        children = [c for c in _children(node, target, h) if c.h <= threshold]
        children.sort(key=lambda c: c.h)
        for k, child in enumerate(children):
            # k counts every child written at this node, dead ends included (paper's numbering).
            child.idx = f"{node.idx},{k}"
            lines.append(explore_line(child.ops[-1], child.nums))
            if len(child.nums) == 1:
                lines.append(leaf_line(child.nums[0], target))
                if child.nums[0] == target:
                    return True
            else:
                lines.append(generated_line(child.idx, target, child.nums, child.ops[-1]))
                lines.append(f"Moving to Node #{child.idx}")
                if visit(child):
                    return True
            if k < len(children) - 1:  # backtrack to this node before the next sibling
                lines.append(f"Moving to Node #{node.idx}")
                lines.append(state_line(target, node.nums, node.ops))
        return False

    root = _Node(list(numbers), [], h(list(numbers), target))
    if not visit(root):
        lines.append(NO_SOLUTION)
    return "\n".join(lines)


def bfs_stream(
    numbers: Sequence[int],
    target: int,
    beam: int,
    heuristic: str | Heuristic = "sum",
    rng: random.Random | None = None,
) -> str:
    """The paper's beam search as a stream: expand up to `beam` best open nodes, keep each one's
    `beam` best children (shuffled with `rng`, so the first one tried varies)."""
    if beam < 1:
        raise ValueError(f"beam must be >= 1, got {beam}")
    h = _heuristic(heuristic)
    rng = rng or random.Random(0)
    lines: list[str] = []
    root = _Node(list(numbers), [], h(list(numbers), target))
    open_set: list[tuple[float, _Node]] = [(root.h, root)]
    while open_set:
        current = [heapq.heappop(open_set)[1] for _ in range(min(beam, len(open_set)))]
        for pos, node in enumerate(current):
            lines.append(state_line(target, node.nums, node.ops))
            children = _children(node, target, h)
            children.sort(key=lambda c: c.h)
            kept = children[:beam]
            rng.shuffle(kept)
            k = 0  # counts generated nodes only: dead ends get no number of their own
            for child in kept:
                child.idx = f"{node.idx},{k}"
                lines.append(explore_line(child.ops[-1], child.nums))
                if len(child.nums) == 1:
                    lines.append(leaf_line(child.nums[0], target))
                    if child.nums[0] == target:
                        return "\n".join(lines)
                else:
                    lines.append(generated_line(child.idx, target, child.nums, child.ops[-1]))
                    k += 1
            kept.sort(key=lambda c: c.h)
            for child in kept:
                if len(child.nums) > 1:  # a finished leaf has nothing left to expand
                    heapq.heappush(open_set, (child.h, child))
            if pos < len(current) - 1:
                lines.append(f"Moving to Node #{current[pos + 1].idx}")
        if open_set:
            lines.append(f"Moving to Node #{open_set[0][1].idx}")
    lines.append(NO_SOLUTION)
    return "\n".join(lines)


def optimal_stream(numbers: Sequence[int], target: int, solution: Sequence[str]) -> str:
    """The paper's no-backtracking baseline: the solution path written in stream vocabulary.

    Node numbers run 2, 3, ... as in the paper. Used numbers are removed as a multiset
    (first occurrence of each operand), so repeated inputs stay correct.
    """
    nums = list(numbers)
    ops: list[str] = []
    lines = [state_line(target, nums, ops)]
    for node_index, op in enumerate(solution, start=2):
        parsed = parse_operation(op)
        if parsed is None:
            raise ValueError(f"cannot parse operation {op!r}")
        a, _, b, result = parsed
        rest = list(nums)
        for operand in (a, b):
            if operand not in rest:
                raise ValueError(f"operation {op!r} uses {operand}, not in {nums}")
            rest.remove(operand)
        nums = rest + [result]
        lines.append(explore_line(op, nums))
        if len(nums) == 1:
            lines.append(leaf_line(nums[0], target))
        else:
            ops.append(op)
            lines.append(f"Generated Node #{node_index}: {nums} from Operation: {op}")
            lines.append(state_line(target, nums, ops))
    return "\n".join(lines)


@dataclass(frozen=True)
class Stream:
    """One written search: its text and how it was made."""

    text: str
    search_type: str  # "dfs" or "bfs_<beam>"
    heuristic: str
    goal_reached: bool

    def to_dict(self) -> dict:
        return asdict(self)


def reached_goal(text: str) -> bool:
    return "equal: Goal Reached" in text


def random_stream(
    problem: "Problem",
    rng: random.Random,
    strategies: Sequence[str] = ("dfs", "bfs"),
    heuristics: Sequence[str] = ("sum", "mult"),
    beams: Sequence[int] = (1, 2, 3, 4, 5),
) -> Stream:
    """A stream by a search picked at random the way the paper's data was made: a heuristic,
    then DFS or BFS, then (for BFS) a beam width. All choices come from `rng`."""
    heuristic = rng.choice(list(heuristics))
    strategy = rng.choice(list(strategies))
    numbers, target = list(problem.numbers), problem.target
    if strategy == "dfs":
        text = dfs_stream(numbers, target, heuristic)
        search_type = "dfs"
    elif strategy == "bfs":
        beam = rng.choice(list(beams))
        text = bfs_stream(numbers, target, beam, heuristic, rng)
        search_type = f"bfs_{beam}"
    else:
        raise ValueError(f"unknown search strategy {strategy!r}; choose from ['dfs', 'bfs']")
    return Stream(text, search_type, heuristic, reached_goal(text))
