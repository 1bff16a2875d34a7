"""Text environments behind one interface, their task splits, and the env registry.

    import envs
    env = envs.make("countdown_search", reward_density="dense")
    tasks = envs.make_tasks("countdown_search").tasks("heldout_unseen")

Nothing here imports torch, transformers or ray.
"""

from . import (
    countdown,  # noqa: E402,F401  (registers the Countdown envs)
    textworld,  # noqa: E402,F401  (registers the TextWorld env)
)
from .base import (
    MAX_TEXT_LENGTH,
    REQUIRED_INFO_KEYS,
    TRAIN_SPLIT,
    BaseEnvConfig,
    EnvConfigError,
    TaskSource,
    TextEnv,
    config_class,
    list_envs,
    make,
    make_info,
    make_tasks,
    register,
    validate_config,
)

__all__ = [
    "MAX_TEXT_LENGTH",
    "REQUIRED_INFO_KEYS",
    "TRAIN_SPLIT",
    "BaseEnvConfig",
    "EnvConfigError",
    "TaskSource",
    "TextEnv",
    "config_class",
    "list_envs",
    "make",
    "make_info",
    "make_tasks",
    "register",
    "validate_config",
]
