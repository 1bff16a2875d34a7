"""Countdown (Stream of Search): problems, search streams, verifier and environments.

Registers two envs: "countdown" (one turn: write a whole stream) and "countdown_search"
(many turns: grow the search tree a line at a time). Both imitate the same demonstrations.
"""

from ..base import register
from .demos import CountdownDemoOptions, demonstration, demonstrations, task_demonstrations
from .env import CountdownSearchConfig, CountdownSearchEnv, CountdownStreamEnv
from .format import SearchLineFormat, StreamFormat
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
from .stats import demo_stats, eval_stats, failure_kind
from .verify import Verdict, verify_solution, verify_stream

_DEMOS = dict(demos=task_demonstrations, demo_options=CountdownDemoOptions, demo_stats=demo_stats)
register("countdown", CountdownStreamEnv, CountdownConfig, CountdownTasks, format=StreamFormat(),
         eval_stats=eval_stats, **_DEMOS)
register("countdown_search", CountdownSearchEnv, CountdownSearchConfig, CountdownTasks,
         format=SearchLineFormat(), **_DEMOS)

__all__ = [
    "CountdownConfig",
    "CountdownDemoOptions",
    "CountdownSearchConfig",
    "CountdownSearchEnv",
    "CountdownStreamEnv",
    "CountdownTasks",
    "Problem",
    "SearchLineFormat",
    "StreamFormat",
    "Stream",
    "Verdict",
    "bfs_stream",
    "can_reach",
    "combine",
    "demonstration",
    "demonstrations",
    "demo_stats",
    "dfs_stream",
    "eval_stats",
    "failure_kind",
    "load_problems_jsonl",
    "mult_heuristic",
    "optimal_stream",
    "random_stream",
    "solve",
    "sum_heuristic",
    "task_demonstrations",
    "verify_solution",
    "verify_stream",
]
