"""ALFWorld: household tasks of six types in AI2-THOR's rooms, as text games.

Registers the env "alfworld":

    import envs
    source = envs.make_tasks("alfworld", train_size=60, heldout_size=12)
    env = envs.make("alfworld", reward_density="dense")
    obs, info = env.reset(options={"task": source.tasks("heldout")[0]})
    obs, reward, terminated, truncated, info = env.step("go to fridge 1")

Games are generated offline from the floor plans the alfworld package ships (or read from the
official ALFWorld data with `source: official`) and played through textworld's PDDL backend with
ALFWorld's wrappers. The alfworld package (an optional extra) is imported only when games are
made or played, so `import envs` works without it.
"""

from ..base import register
from ..textworld.format import CommandFormat
from .config import TASK_TYPES, AlfWorldConfig
from .demos import AlfWorldDemoOptions, demonstrations, task_demonstrations, with_walkthrough
from .env import AlfWorldEnv, normalize_command
from .generate import AlfWorldGames, AlfWorldReport, check_game, generate_one, start_game
from .stats import demo_stats, eval_stats
from .tasks import HELDOUT, HELDOUT_SEEN, SEED_START, SPLITS, AlfWorldTasks, load_games

# Text-game commands, written as "> go to fridge 1" (TextWorld's format, shared).
register("alfworld", AlfWorldEnv, AlfWorldConfig, AlfWorldTasks, format=CommandFormat(),
         demos=task_demonstrations, demo_options=AlfWorldDemoOptions, demo_stats=demo_stats,
         eval_stats=eval_stats)

__all__ = [
    "HELDOUT",
    "HELDOUT_SEEN",
    "SEED_START",
    "SPLITS",
    "TASK_TYPES",
    "AlfWorldConfig",
    "AlfWorldDemoOptions",
    "AlfWorldEnv",
    "AlfWorldGames",
    "AlfWorldReport",
    "AlfWorldTasks",
    "check_game",
    "demo_stats",
    "demonstrations",
    "eval_stats",
    "generate_one",
    "load_games",
    "normalize_command",
    "start_game",
    "task_demonstrations",
    "with_walkthrough",
]
