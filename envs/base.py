"""The shared text-environment interface, task sources, and the env registry.

Every environment is a gymnasium.Env whose observations and actions are strings:

    env = envs.make("countdown_search", reward_density="dense", num_inputs=3)
    obs, info = env.reset(seed=0, options={"task": task})
    obs, reward, terminated, truncated, info = env.step("66-42=24")

`info` always carries `won`, `reward_components`, `infra_error` and `admissible_actions`
(an empty list where the game has none). Task sets live in a TaskSource with a `train` split and
held-out splits that never overlap it.
"""

from __future__ import annotations

import abc
import difflib
import json
import random
import string
from dataclasses import dataclass
from typing import Any, Iterator, Literal

import gymnasium
from gymnasium.spaces import Text
from pydantic import BaseModel, ConfigDict, Field, ValidationError

# Long enough for a full stream of search over 6 numbers; gymnasium needs some bound.
MAX_TEXT_LENGTH = 1 << 20
# Everything a model can sensibly write, newline and tab included.
TEXT_CHARSET = string.printable

TRAIN_SPLIT = "train"

RewardDensity = Literal["sparse", "dense"]


class EnvConfigError(ValueError):
    """A bad env name, config key or config value; the message says which and what to do."""


class BaseEnvConfig(BaseModel):
    """Fields every environment takes. Env configs subclass this (plain pydantic v2 models)."""

    model_config = ConfigDict(extra="forbid")

    reward_density: RewardDensity = Field(
        "sparse",
        description="sparse: 1.0 on the winning step, else 0. dense: per-turn progress, "
        "episode total <= 1 and exactly 1.0 on a win.",
    )


def make_info(
    won: bool,
    reward_components: dict[str, float],
    admissible_actions: list[str] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """An info dict with the keys every env promises; `infra_error` is set by the rollout layer."""
    return {
        "won": bool(won),
        "reward_components": {k: float(v) for k, v in reward_components.items()},
        "infra_error": False,
        "admissible_actions": list(admissible_actions or []),
        **extra,
    }


REQUIRED_INFO_KEYS = ("won", "reward_components", "infra_error", "admissible_actions")


class TextEnv(gymnasium.Env):
    """A gymnasium env with string observations and actions.

    Subclasses implement reset(seed=None, options={"task": task}) -> (obs, info) and
    step(action) -> (obs, reward, terminated, truncated, info), with infos built by make_info().
    `reward_components` holds the named turn-level signals behind this step's reward; `reward`
    is the env's own combination of them under its reward_density.
    """

    metadata = {"render_modes": []}

    def __init__(self) -> None:
        super().__init__()
        self.observation_space = Text(MAX_TEXT_LENGTH, min_length=0, charset=TEXT_CHARSET)
        self.action_space = Text(MAX_TEXT_LENGTH, min_length=0, charset=TEXT_CHARSET)


class TaskSource(abc.ABC):
    """Named splits of JSON-able task dicts, deterministic for a given config.

    `train` is always a split; every other split is held out and shares no task with train
    (as judged by task_key).
    """

    @abc.abstractmethod
    def splits(self) -> list[str]:
        """Split names, `train` first."""

    @abc.abstractmethod
    def tasks(self, split: str) -> list[dict]:
        """All tasks of a split, as dicts that env.reset(options={"task": ...}) accepts."""

    def demonstrations(self, split: str, n: int, seed: int, **options: Any) -> Iterator[dict]:
        """Expert demonstrations for SFT on the first n tasks of `split`: dicts with at least
        `prompt` (the first observation) and `completion` (what the policy should write)."""
        raise NotImplementedError(f"{type(self).__name__} has no expert demonstrations")

    def tasks_from_file(self, path: str) -> list[dict]:
        """Tasks a user brings in a file (format per env); errors name the file and line."""
        raise NotImplementedError(f"{type(self).__name__} cannot read tasks from a file")

    def heldout_splits(self) -> list[str]:
        return [s for s in self.splits() if s != TRAIN_SPLIT]

    def sample_tasks(self, split: str, n: int, rng: random.Random, skip: int = 0) -> list[dict]:
        """n tasks of `split` drawn with replacement by `rng` (RL's per-iteration task batch),
        never one of its first `skip` tasks."""
        if not hasattr(self, "_sample_pool"):
            self._sample_pool: dict[str, list[dict]] = {}
        if split not in self._sample_pool:  # built once: tasks() copies the whole split
            self._sample_pool[split] = self.tasks(split)
        pool = self._sample_pool[split][skip:]
        if not pool:
            raise ValueError(f"split {split!r} has no tasks to sample past its first {skip} "
                             f"(it holds {len(self._sample_pool[split])})")
        return [pool[rng.randrange(len(pool))] for _ in range(n)]

    def task_key(self, task: dict) -> Any:
        """What makes two tasks the same task; overlap between splits is judged on it."""
        return json.dumps({k: v for k, v in task.items() if k != "id"}, sort_keys=True)

    def _check_split(self, split: str) -> None:
        if split not in self.splits():
            raise KeyError(f"unknown split {split!r}; splits are {self.splits()}")


# ---------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class EnvSpec:
    name: str
    env_cls: type[TextEnv]
    config_cls: type[BaseModel]
    tasks_cls: type[TaskSource]


_REGISTRY: dict[str, EnvSpec] = {}


def register(
    name: str, env_cls: type[TextEnv], config_cls: type[BaseModel], tasks_cls: type[TaskSource]
) -> None:
    """Make an env constructible by name. The env and task classes take one validated config."""
    if name in _REGISTRY and _REGISTRY[name].env_cls is not env_cls:
        raise ValueError(f"env {name!r} is already registered to {_REGISTRY[name].env_cls}")
    _REGISTRY[name] = EnvSpec(name, env_cls, config_cls, tasks_cls)


def list_envs() -> list[str]:
    return sorted(_REGISTRY)


def _spec(name: str) -> EnvSpec:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise EnvConfigError(f"unknown env {name!r}{hint}; known envs: {list_envs()}")
    return _REGISTRY[name]


def config_class(name: str) -> type[BaseModel]:
    """The pydantic config model of a registered env."""
    return _spec(name).config_cls


def _describe_error(err: dict, valid_keys: list[str]) -> str:
    loc = ".".join(str(part) for part in err["loc"])
    if err["type"] == "extra_forbidden":
        close = difflib.get_close_matches(loc, valid_keys, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown config key {loc!r}{hint}"
    msg = err["msg"].removeprefix("Value error, ")
    if not loc:  # whole-model checks name their fields in the message itself
        return msg
    return f"{loc!r}: {msg} (got {err['input']!r})"


def validate_config(name: str, config: BaseModel | dict | None = None, **cfg: Any) -> BaseModel:
    """A validated config for env `name` from a config object and/or keyword overrides."""
    spec = _spec(name)
    values = dict(cfg)
    if isinstance(config, BaseModel):
        values = {**config.model_dump(exclude_unset=True), **values}
    elif isinstance(config, dict):
        values = {**config, **values}
    elif config is not None:
        raise EnvConfigError(f"{name}: config must be a dict or {spec.config_cls.__name__}")
    try:
        return spec.config_cls(**values)
    except ValidationError as e:
        valid_keys = list(spec.config_cls.model_fields)
        problems = [_describe_error(err, valid_keys) for err in e.errors()]
        if any(err["type"] == "extra_forbidden" for err in e.errors()):
            problems.append(f"valid keys: {valid_keys}")
        raise EnvConfigError(f"{name} config: " + "; ".join(problems)) from None


def make(name: str, config: BaseModel | dict | None = None, /, **cfg: Any) -> TextEnv:
    """Build the env `name` from keyword config values (validated; EnvConfigError if bad)."""
    return _spec(name).env_cls(validate_config(name, config, **cfg))


def make_tasks(name: str, config: BaseModel | dict | None = None, /, **cfg: Any) -> TaskSource:
    """Build the task source of env `name` from the same config values as make()."""
    return _spec(name).tasks_cls(validate_config(name, config, **cfg))
