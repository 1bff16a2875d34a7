"""TextWorld settings: complexity names and the env / task-source config.

A complexity name says which games to generate:

  w{W}-o{O}-q{Q}      a custom game (tw-make custom): W rooms, O objects, quest length Q,
                      e.g. w2-o3-q4, w4-o6-q8 (one point for the quest: sparse by nature)
  tw-simple           textworld's "simple" challenge, dense rewards, detailed goal
                      (= tw-simple-dense-detailed); also tw-simple-{dense|balanced|sparse}
                      [-{detailed|brief|none}]
  tw-cooking          textworld's cooking challenge (First TextWorld Problems):
                      = tw-cooking-r1-t1-g6-open-cook-cut; in general
                      tw-cooking-r{R}-t{T}-g{1|6|9|12}[-open][-cook][-cut][-drop]
                      (R ingredients, T of them to find, G rooms, the skills needed)

Aliases map to one canonical name, which names the cache folder, so one set of settings has
one cache.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pydantic import Field, field_validator

from ..base import BaseEnvConfig

CUSTOM_RE = re.compile(r"^w(\d+)-o(\d+)-q(\d+)$")
SIMPLE_REWARDS = ("dense", "balanced", "sparse")
SIMPLE_GOALS = ("detailed", "brief", "none")
COOKING_GO = (1, 6, 9, 12)
COOKING_SKILLS = ("open", "cook", "cut", "drop")
COOKING_DEFAULT = "tw-cooking-r1-t1-g6-open-cook-cut"
SIMPLE_DEFAULT = "tw-simple-dense-detailed"

# Episode budgets when the config does not set max_turns.
TURNS_PER_QUEST_STEP = 3  # custom games: 3 x quest length (12 for w2-o3-q4, 24 for w4-o6-q8)
SIMPLE_MAX_TURNS = 30  # walkthroughs are 8-10 commands
COOKING_MAX_TURNS = 50  # walkthroughs of the default recipe are ~10 commands

NAMES_HELP = (
    "use w{W}-o{O}-q{Q} (W rooms, O objects, quest length Q, e.g. w2-o3-q4 or w4-o6-q8), "
    "tw-simple[-{dense|balanced|sparse}[-{detailed|brief|none}]] or "
    "tw-cooking[-r{R}-t{T}-g{1|6|9|12}[-open][-cook][-cut][-drop]]"
)


@dataclass(frozen=True)
class Complexity:
    """Parsed game settings. `kind` is custom, simple or cooking; `name` is canonical."""

    name: str
    kind: Literal["custom", "simple", "cooking"]
    world_size: int | None = None
    nb_objects: int | None = None
    quest_length: int | None = None
    challenge_settings: dict[str, Any] = field(default_factory=dict)

    @property
    def default_max_turns(self) -> int:
        if self.kind == "custom":
            return TURNS_PER_QUEST_STEP * int(self.quest_length)
        return SIMPLE_MAX_TURNS if self.kind == "simple" else COOKING_MAX_TURNS

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_complexity(name: str) -> Complexity:
    """A Complexity from its name; ValueError says what is wrong and what names exist."""
    if not isinstance(name, str):
        raise ValueError(f"complexity must be a string; {NAMES_HELP}")
    text = name.strip().lower()
    m = CUSTOM_RE.match(text)
    if m:
        w, o, q = (int(g) for g in m.groups())
        if w < 1:
            raise ValueError(f"world size must be >= 1 room (w{w} in {name!r})")
        if q < 1:
            raise ValueError(f"quest length must be >= 1 (q{q} in {name!r})")
        return Complexity(f"w{w}-o{o}-q{q}", "custom", w, o, q)
    if text == "tw-simple" or text.startswith("tw-simple-"):
        return _parse_simple(name, text)
    if text == "tw-cooking" or text.startswith("tw-cooking-"):
        return _parse_cooking(name, text)
    raise ValueError(f"unknown complexity name {name!r}; {NAMES_HELP}")


def _parse_simple(name: str, text: str) -> Complexity:
    if text == "tw-simple":
        text = SIMPLE_DEFAULT
    parts = text.removeprefix("tw-simple-").split("-")
    rewards = parts[0]
    goal = parts[1] if len(parts) > 1 else "detailed"
    if rewards not in SIMPLE_REWARDS or goal not in SIMPLE_GOALS or len(parts) > 2:
        raise ValueError(f"unknown complexity name {name!r}: tw-simple takes a reward frequency "
                         f"{SIMPLE_REWARDS} then a goal {SIMPLE_GOALS}, e.g. tw-simple-dense-brief")
    settings = {"rewards": rewards, "goal": goal, "test": False}
    return Complexity(f"tw-simple-{rewards}-{goal}", "simple", challenge_settings=settings)


def _parse_cooking(name: str, text: str) -> Complexity:
    if text == "tw-cooking":
        text = COOKING_DEFAULT
    recipe, take, go = 1, 0, 1  # tw-make's defaults when a token is left out
    skills: set[str] = set()
    for token in text.removeprefix("tw-cooking-").split("-"):
        m = re.fullmatch(r"([rtg])(\d+)", token)
        if m and m.group(1) == "r":
            recipe = int(m.group(2))
        elif m and m.group(1) == "t":
            take = int(m.group(2))
        elif m and m.group(1) == "g":
            go = int(m.group(2))
        elif token in COOKING_SKILLS:
            skills.add(token)
        else:
            raise ValueError(f"unknown complexity name {name!r}: bad tw-cooking part {token!r}; "
                             f"{NAMES_HELP}")
    if recipe < 1:
        raise ValueError(f"tw-cooking recipe must have >= 1 ingredient (r{recipe} in {name!r})")
    if take > recipe:
        raise ValueError(f"tw-cooking take (t{take}) must be <= recipe (r{recipe}) in {name!r}")
    if go not in COOKING_GO:
        raise ValueError(f"tw-cooking rooms must be one of {COOKING_GO} (g{go} in {name!r})")
    flags = [s for s in COOKING_SKILLS if s in skills]
    canonical = "-".join(["tw-cooking", f"r{recipe}", f"t{take}", f"g{go}", *flags])
    settings = {"recipe": recipe, "take": take, "go": go, "recipe_seed": 0, "split": None,
                **{s: s in skills for s in COOKING_SKILLS}}
    return Complexity(canonical, "cooking", challenge_settings=settings)


class TextWorldConfig(BaseEnvConfig):
    """Config of the `textworld` env and of its task splits (generated games, cached)."""

    complexity: str = Field("w2-o3-q4", description="which games: w{W}-o{O}-q{Q}, tw-simple, "
                                                    "tw-cooking (see envs/textworld/config.py)")
    train_size: int = Field(100, ge=0, description="games in the train split")
    heldout_size: int = Field(50, ge=0, description="games in each held-out split (heldout, valid)")
    cache_dir: str = Field("data/textworld", description="generated games go to "
                                                         "<cache_dir>/<complexity>/")
    workers: int = Field(1, ge=1, description="parallel processes generating games")
    progress: bool = Field(True, description="progress bar and summary line while generating")
    max_turns: int | None = Field(
        None, ge=1, description="turns before truncation; default per complexity "
        "(3 x quest length for w-o-q games: 12 for w2-o3-q4, 24 for w4-o6-q8)"
    )
    admissible_commands: bool = Field(False, description="list the admissible commands in "
                                                         "every observation")
    show_description: bool = Field(False, description="append the room description to every "
                                                      "observation (the first always has it)")
    show_inventory: bool = Field(False, description="append the inventory to every observation "
                                                    "(the first always has it)")
    show_objective: bool = Field(False, description="repeat the objective after the game's reply in "
                                                    "every observation (the first always has it)")

    @field_validator("complexity")
    @classmethod
    def _check_complexity(cls, value: str) -> str:
        parse_complexity(value)
        return value

    @property
    def parsed(self) -> Complexity:
        return parse_complexity(self.complexity)

    @property
    def turn_limit(self) -> int:
        return self.max_turns if self.max_turns is not None else self.parsed.default_max_turns
