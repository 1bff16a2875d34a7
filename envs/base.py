"""The shared text-environment interface, task sources, and the env registry.

Every environment is a gymnasium.Env whose observations and actions are strings:

    env = envs.make("countdown_search", reward_density="dense", num_inputs=3)
    obs, info = env.reset(seed=0, options={"task": task})
    obs, reward, terminated, truncated, info = env.step("66-42=24")

`info` always carries `won`, `reward_components`, `infra_error` and `admissible_actions`
(an empty list where the game has none). Task sets live in a TaskSource with a `train` split, a
`valid` split (for tuning and periodic evals) and test splits, no two of which share a task.

An environment is one package under envs/ and one `register(...)` call: its env, config and task
classes, its prompt/action Format, its demonstration builder and that builder's options schema,
and the statistics only it knows how to compute (of its demos, of an evaluation's records).
Nothing outside its package knows anything about it.
"""

from __future__ import annotations

import abc
import difflib
import json
import random
import string
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal

import gymnasium
from gymnasium.spaces import Text
from pydantic import BaseModel, ConfigDict, Field, ValidationError

# Long enough for a full stream of search over 6 numbers; gymnasium needs some bound.
MAX_TEXT_LENGTH = 1 << 20
# Everything a model can sensibly write, newline and tab included.
TEXT_CHARSET = string.printable

TRAIN_SPLIT = "train"
# The split that tuning and periodic evals read; the other held-out splits are reported once.
VALID_SPLIT = "valid"

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

# Dense progress is paid in multiples of 2**-20 so every partial sum is exact in floating point
# and a won episode sums to exactly 1.0 whatever the order or the episode's scale.
_QUANTUM = 2.0**-20


def quantize(x: float) -> float:
    """x rounded to a multiple of 2**-20 (see _QUANTUM)."""
    return round(x / _QUANTUM) * _QUANTUM


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


class Format:
    """How an env's observation becomes the policy's prompt, and the policy's text an action.

    One format per environment, pure text (no tokenizer). The same format serves SFT (a
    demonstration as text segments), evaluation and RL rollouts, so the policy always sees one
    layout; because SFT tokenises each segment on its own exactly as the episode runner does turn
    by turn, it also sees the same token ids. A format answers six questions:

        prompt(obs)                      the text of the first prompt (after <bos>)
        stop_texts                       where a turn's generation ends (() = only at <eos>)
        action(obs, completion)          the text handed to env.step
        observation(obs, action, text)   the text appended to the conversation after env.step
        segments(demo)                   a demonstration as [(text, written_by_policy), ...]
        choices(info)                    the texts the policy may write next, when the env lists
                                         its actions (rollout.constrain_actions); else None

    `multi_turn` says whether an episode can have more than one turn (single-turn envs are
    evaluated in one batched generation); `lists_choices` whether choices() can return a list.
    The defaults below are a line-per-turn game; subclasses override what differs.
    """

    multi_turn: bool = True
    lists_choices: bool = False
    stop_texts: tuple[str, ...] = ("\n",)

    def prompt(self, observation: str) -> str:
        return observation + "\n"

    def action(self, observation: str, completion: str) -> str:
        return completion.strip()

    def observation(self, observation: str, action: str, completion: str) -> str:
        return observation + "\n"

    def segments(self, demo: dict) -> list[tuple[str, bool]]:
        return [(self.prompt(demo["prompt"]), False), (demo["completion"], True)]

    def choices(self, info: dict) -> list[str] | None:
        return None


class DemoOptions(BaseModel):
    """The options of an env's demonstration builder: the keys of `sft.demos` besides
    `num_examples`. Envs subclass it; an env without options takes none."""

    model_config = ConfigDict(extra="forbid")


class TaskSource(abc.ABC):
    """Named splits of JSON-able task dicts, deterministic for a given config.

    `train` is always a split and `valid` is there for tuning; every other split is a test split.
    No two splits share a task (as judged by task_key), and sample_tasks (RL's train draws)
    never returns a task of a held-out split.
    """

    @abc.abstractmethod
    def splits(self) -> list[str]:
        """Split names, `train` first."""

    @abc.abstractmethod
    def tasks(self, split: str) -> list[dict]:
        """All tasks of a split, as dicts that env.reset(options={"task": ...}) accepts."""

    def tasks_from_file(self, path: str) -> list[dict]:
        """Tasks a user brings in a file (format per env); errors name the file and line."""
        raise NotImplementedError(f"{type(self).__name__} cannot read tasks from a file")

    def heldout_splits(self) -> list[str]:
        """Every split but train: `valid` and the test splits."""
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


# A demonstration builder: (task source, split, n, seed, start=0, **options) -> one entry per task
# of the split's tasks [start, n), in order: its demo (a dict the env's Format.segments() reads),
# or None where the expert's demo was dropped (it did not win). The entries from `start` on are the
# same as those of a run from 0, so a killed data step resumes at the next task (algos/data.py).
DemoBuilder = Callable[..., Iterator[dict | None]]


@dataclass(frozen=True)
class EnvSpec:
    """Everything env-specific that the trainer needs, registered once per env."""

    name: str
    env_cls: type[TextEnv]
    config_cls: type[BaseModel]
    tasks_cls: type[TaskSource]
    format: Format
    demos: DemoBuilder | None = None
    demo_options: type[DemoOptions] = DemoOptions
    # statistics of the written demos (stats.json beside them), e.g. how many reach the goal
    demo_stats: Callable[[list[dict]], dict] | None = None
    # statistics of an evaluation's records (summary keys), e.g. the commonest failure kinds
    eval_stats: Callable[[list[dict]], dict] | None = None
    # data preparation beyond the task splits (`launch.py gen-data` only, the one step that may
    # download): (validated config, progress) -> stats or None; e.g. SWE's fetch and synthesis
    prepare: Callable[[BaseModel, bool], dict | None] | None = None


_REGISTRY: dict[str, EnvSpec] = {}


def register(name: str, env_cls: type[TextEnv], config_cls: type[BaseModel], tasks_cls: type[TaskSource],
             *, format: Format, demos: DemoBuilder | None = None,
             demo_options: type[DemoOptions] = DemoOptions,
             demo_stats: Callable[[list[dict]], dict] | None = None,
             eval_stats: Callable[[list[dict]], dict] | None = None,
             prepare: Callable[[BaseModel, bool], dict | None] | None = None) -> None:
    """Make an env constructible by name. The env and task classes take one validated config."""
    if name in _REGISTRY and _REGISTRY[name].env_cls is not env_cls:
        raise ValueError(f"env {name!r} is already registered to {_REGISTRY[name].env_cls}")
    _REGISTRY[name] = EnvSpec(name, env_cls, config_cls, tasks_cls, format, demos, demo_options,
                              demo_stats, eval_stats, prepare)


def closest(word: Any, choices: list[str], cutoff: float = 0.6) -> str | None:
    """The choice most like `word` (for "did you mean ..."), or None if none is close."""
    close = difflib.get_close_matches(str(word), choices, n=1, cutoff=cutoff)
    return close[0] if close else None


def list_envs() -> list[str]:
    return sorted(_REGISTRY)


def spec(name: str) -> EnvSpec:
    """The registration of env `name` (EnvConfigError naming the closest known env if none)."""
    if name not in _REGISTRY:
        close = closest(name, list(_REGISTRY))
        hint = f" (did you mean {close!r}?)" if close else ""
        raise EnvConfigError(f"unknown env {name!r}{hint}; known envs: {list_envs()}")
    return _REGISTRY[name]


def config_class(name: str) -> type[BaseModel]:
    """The pydantic config model of a registered env."""
    return spec(name).config_cls


def format_for(name: str) -> Format:
    """The prompt/action format of a registered env."""
    return spec(name).format


def fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """The valid keys of the (nested) section of `model` at `loc`, for 'did you mean'."""
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def describe_error(err: dict, schema: type[BaseModel], prefix: tuple = (), where: str = "",
                   extra_keys: tuple[str, ...] = ()) -> str:
    """One line for one pydantic error of `schema`: the dotted key (under `prefix`), where it came
    from (`where`, e.g. a file), and for an unknown key the closest valid one and all valid ones
    (`extra_keys`: keys of the section that `schema` itself does not hold)."""
    loc = tuple(prefix) + tuple(str(p) for p in err["loc"])
    key = ".".join(loc)
    at = f" ({where})" if where else ""
    if err["type"] == "extra_forbidden":
        valid = [*extra_keys, *fields_at(schema, tuple(err["loc"][:-1]))]
        close = closest(err["loc"][-1], valid, cutoff=0.5)
        hint = f"; did you mean '{'.'.join(loc[:-1] + (close,))}'?" if close else ""
        return f"unknown key '{key}'{at}{hint} Valid keys here: {', '.join(valid)}"
    if err["type"] == "missing":
        return f"missing key '{key}'{at}"
    got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
    msg = err["msg"].removeprefix("Value error, ")
    if not loc:  # whole-model checks name their fields in the message itself
        return f"{where}: {msg}" if where else msg
    return f"bad value for '{key}'{at}: {msg}{got}"


def validate_config(name: str, config: BaseModel | dict | None = None, **cfg: Any) -> BaseModel:
    """A validated config for env `name` from a config object and/or keyword overrides."""
    env = spec(name)
    values = dict(cfg)
    if isinstance(config, BaseModel):
        values = {**config.model_dump(exclude_unset=True), **values}
    elif isinstance(config, dict):
        values = {**config, **values}
    elif config is not None:
        raise EnvConfigError(f"{name}: config must be a dict or {env.config_cls.__name__}")
    try:
        return env.config_cls(**values)
    except ValidationError as e:
        problems = [describe_error(err, env.config_cls) for err in e.errors()]
        raise EnvConfigError(f"{name} config: " + "; ".join(problems)) from None


def validate_demo_options(name: str, options: dict) -> DemoOptions:
    """The demonstration options of env `name`, validated by its own schema."""
    schema = spec(name).demo_options
    try:
        return schema(**options)
    except ValidationError as e:
        problems = [describe_error(err, schema) for err in e.errors()]
        raise EnvConfigError(f"{name} demonstration options: " + "; ".join(problems)) from None


def demos_by_task(name: str, source: TaskSource, split: str, n: int, seed: int = 0, start: int = 0,
                  **options: Any) -> Iterator[dict | None]:
    """Env `name`'s expert demo of each of the tasks [start, n) of `split`, in order; None for a
    task whose demo was dropped (what a resumable data step counts, algos/data.py)."""
    builder = spec(name).demos
    if builder is None:
        raise EnvConfigError(f"env {name!r} has no expert demonstrations to imitate")
    if not 0 <= start <= n:
        raise ValueError(f"demonstrations: start={start} is not in [0, n={n}]")
    return builder(source, split, n, seed, start=start, **options)


def demonstrations(name: str, source: TaskSource, split: str, n: int, seed: int = 0,
                   **options: Any) -> Iterator[dict]:
    """Expert demonstrations of env `name` for SFT, on the first n tasks of `split` of `source`:
    dicts its Format.segments() reads (most have `prompt` and `completion`); dropped ones left out."""
    return (d for d in demos_by_task(name, source, split, n, seed, **options) if d is not None)


def make(name: str, config: BaseModel | dict | None = None, /, **cfg: Any) -> TextEnv:
    """Build the env `name` from keyword config values (validated; EnvConfigError if bad)."""
    return spec(name).env_cls(validate_config(name, config, **cfg))


def make_tasks(name: str, config: BaseModel | dict | None = None, /, **cfg: Any) -> TaskSource:
    """Build the task source of env `name` from the same config values as make()."""
    return spec(name).tasks_cls(validate_config(name, config, **cfg))


def prepare(name: str, config: BaseModel | dict | None = None, /, progress: bool = True, **cfg: Any) -> dict | None:
    """Env `name`'s own data preparation (launch.py gen-data), if it has one: its stats, else None."""
    hook = spec(name).prepare
    return hook(validate_config(name, config, **cfg), progress) if hook is not None else None


def timed_play(env: TextEnv, tasks: list[dict], follow_walkthrough: bool, seed: int = 0) -> dict[str, float]:
    """Play each task once, following its `walkthrough` or picking admissible actions at random
    (the env-speed benches of the text games): episodes won, steps taken, time per step and reset."""
    rng = random.Random(seed)
    steps = wins = 0
    reset_s = step_s = 0.0
    for task in tasks:
        t = time.perf_counter()
        _, info = env.reset(options={"task": task})
        reset_s += time.perf_counter() - t
        plan = list(task["walkthrough"]) if follow_walkthrough else None
        done = False
        while not done:
            action = plan.pop(0) if plan else rng.choice(info["admissible_actions"] or ["look"])
            t = time.perf_counter()
            _, _, terminated, truncated, info = env.step(action)
            step_s += time.perf_counter() - t
            steps += 1
            done = terminated or truncated
        wins += info["won"]
    return {"episodes": len(tasks), "won": wins, "steps": steps, "steps_per_s": round(steps / step_s, 1),
            "ms_per_step": round(1000 * step_s / steps, 2), "ms_per_reset": round(1000 * reset_s / len(tasks), 1)}
