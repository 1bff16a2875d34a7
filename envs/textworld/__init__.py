"""TextWorld: generated text games by complexity, cached offline, with walkthrough demos.

Registers the env "textworld":

    import envs
    source = envs.make_tasks("textworld", complexity="w2-o3-q4", train_size=100)
    env = envs.make("textworld", complexity="w2-o3-q4", reward_density="dense")
    obs, info = env.reset(options={"task": source.tasks("heldout")[0]})
    obs, reward, terminated, truncated, info = env.step("go north")

The textworld package itself (an optional extra) is imported only when games are generated or
played, so `import envs` works without it.
"""

from ..base import register
from .config import Complexity, TextWorldConfig, parse_complexity
from .demos import (
    TextWorldDemoOptions,
    demo_pairs,
    demonstration,
    demonstrations,
    flatten_demo,
    task_demonstrations,
)
from .env import BLOCKED_REPLY, TextWorldEnv, clean_text, command_from_action
from .format import ACTION_PREFIX, CommandFormat
from .generate import GameCache, GenerationReport, generate_one, replay_walkthrough
from .tasks import HELDOUT, SEED_START, TextWorldTasks, load_games

register("textworld", TextWorldEnv, TextWorldConfig, TextWorldTasks, format=CommandFormat(),
         demos=task_demonstrations, demo_options=TextWorldDemoOptions)

__all__ = [
    "ACTION_PREFIX",
    "BLOCKED_REPLY",
    "CommandFormat",
    "HELDOUT",
    "SEED_START",
    "Complexity",
    "GameCache",
    "GenerationReport",
    "TextWorldConfig",
    "TextWorldDemoOptions",
    "TextWorldEnv",
    "TextWorldTasks",
    "clean_text",
    "command_from_action",
    "demo_pairs",
    "demonstration",
    "demonstrations",
    "flatten_demo",
    "generate_one",
    "load_games",
    "parse_complexity",
    "replay_walkthrough",
    "task_demonstrations",
]
