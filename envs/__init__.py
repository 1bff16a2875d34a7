"""Text environments behind one interface, their task splits, and the env registry.

    import envs
    env = envs.make("countdown_search", reward_density="dense")
    tasks = envs.make_tasks("countdown_search").tasks("heldout_unseen")
    fmt = envs.format_for("countdown_search")       # how its text becomes prompts and actions

Each environment is one package (envs/countdown, envs/textworld) that registers itself on import.
Nothing here imports torch, transformers or ray.
"""

from . import alfworld, countdown, swe, textworld  # noqa: F401  (imported to register their envs)
from .base import (
    MAX_TEXT_LENGTH,
    REQUIRED_INFO_KEYS,
    TRAIN_SPLIT,
    VALID_SPLIT,
    BaseEnvConfig,
    DemoOptions,
    EnvConfigError,
    EnvSpec,
    Format,
    TaskSource,
    TextEnv,
    closest,
    config_class,
    demonstrations,
    demos_by_task,
    describe_error,
    format_for,
    list_envs,
    make,
    make_info,
    make_tasks,
    prepare,
    register,
    spec,
    validate_config,
    validate_demo_options,
)

__all__ = [
    "MAX_TEXT_LENGTH",
    "REQUIRED_INFO_KEYS",
    "TRAIN_SPLIT",
    "VALID_SPLIT",
    "BaseEnvConfig",
    "DemoOptions",
    "EnvConfigError",
    "EnvSpec",
    "Format",
    "TaskSource",
    "TextEnv",
    "config_class",
    "demonstrations",
    "demos_by_task",
    "closest",
    "describe_error",
    "format_for",
    "list_envs",
    "make",
    "make_info",
    "make_tasks",
    "prepare",
    "register",
    "spec",
    "validate_config",
    "validate_demo_options",
]
