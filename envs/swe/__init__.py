"""SWE: repository-level bug fixing with tools, rewarded by tests (issue 15).

Registers the env "swe":

    import envs
    source = envs.make_tasks("swe")                   # the synthesized cache (launch.py gen-data)
    env = envs.make("swe", reward_density="dense")    # or instances_file=..., repos_dir=...
    obs, info = env.reset(options={"task": source.tasks("valid")[0]})
    obs, reward, terminated, truncated, info = env.step("run_tests\\n\\f")

Modules: `sandbox` (running model commands in an isolated worktree), `instances` (SWE-Gym
records, running their tests), `synth` (offline synthesis), `format` (the tool-call syntax),
`tools`, `env` (episodes and grading), `demos` (the scripted expert). Nothing here imports torch,
transformers or ray; keep this file light (no heavy imports).
"""

from ..base import register
from .config import SweConfig
from .demos import SweDemoOptions, demo_stats, eval_stats, task_demonstrations
from .env import SweEnv, SweTasks
from .format import ToolFormat



def prepare(config: SweConfig, progress: bool = True) -> dict | None:
    """launch.py gen-data: fetch the pinned projects and synthesize (envs/swe/synth.py)."""
    from .synth import prepare_config  # pytest and the synthesis machinery: only when preparing

    return prepare_config(config, progress)


register("swe", SweEnv, SweConfig, SweTasks, format=ToolFormat(), demos=task_demonstrations,
         demo_options=SweDemoOptions, demo_stats=demo_stats, eval_stats=eval_stats, prepare=prepare)
