"""Countdown (Stream of Search): problems, search streams, verifier and environments.

Registers two envs: "countdown" (one turn: write a whole stream) and "countdown_search"
(many turns: grow the search tree a line at a time).
"""

from ..base import register
from .demos import demonstration, demonstrations
from .env import CountdownSearchConfig, CountdownSearchEnv, CountdownStreamEnv
from .problems import CountdownConfig, CountdownTasks, Problem, load_problems_jsonl
from .search import (
    Stream,
    bfs_stream,
    can_reach,
    combine,
    dfs_stream,
    mult_heuristic,
    optimal_stream,
    random_stream,
    solve,
    sum_heuristic,
)
from .verify import Verdict, verify_solution, verify_stream

register("countdown", CountdownStreamEnv, CountdownConfig, CountdownTasks)
register("countdown_search", CountdownSearchEnv, CountdownSearchConfig, CountdownTasks)

__all__ = [
    "CountdownConfig",
    "CountdownSearchConfig",
    "CountdownSearchEnv",
    "CountdownStreamEnv",
    "CountdownTasks",
    "Problem",
    "Stream",
    "Verdict",
    "bfs_stream",
    "can_reach",
    "combine",
    "demonstration",
    "demonstrations",
    "dfs_stream",
    "load_problems_jsonl",
    "mult_heuristic",
    "optimal_stream",
    "random_stream",
    "solve",
    "sum_heuristic",
    "verify_solution",
    "verify_stream",
]
