"""ALFWorld settings: task types, the floor plans of each split, sizes, turns, and the game source.

Splits are by room (AI2-THOR floor plan). The defaults follow ALFRED's own division of its 120
rooms: train plays ALFRED's 96 train rooms (7-30, 207-230, 307-330, 407-430); ALFRED's 24 test
rooms are halved into `valid` (4-6, 204-206, 304-306, 404-406: what tuning reads) and `heldout`
(1-3, 201-203, 301-303, 401-403: rooms never seen in training, the valid_unseen notion); and
`heldout_seen` holds new games in the train rooms. Every setting is checked when the config is
built, so a bad one fails before any game is generated, naming its key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from ..base import BaseEnvConfig
from .layouts import SCENE_TYPES, missing_floor_plans, package_dir

# ALFWorld's six task types, in the order of alfworld's TASK_TYPES (1..6).
TASK_TYPES = (
    "pick_and_place_simple",
    "look_at_obj_in_light",
    "pick_clean_then_place_in_recep",
    "pick_heat_then_place_in_recep",
    "pick_cool_then_place_in_recep",
    "pick_two_obj_and_place",
)
TaskType = Literal[TASK_TYPES]  # the same names, as a pydantic-checked type


def _rooms(first: int, last: int) -> list[int]:
    """Room numbers first..last of every scene type (kitchens 1-30, living rooms 201-230, ...)."""
    return [start + i for start in (r.start for r in SCENE_TYPES.values()) for i in range(first - 1, last)]


TRAIN_FLOOR_PLANS = _rooms(7, 30)
VALID_FLOOR_PLANS = _rooms(4, 6)
HELDOUT_FLOOR_PLANS = _rooms(1, 3)
FLOOR_PLAN_KEYS = ("train_floor_plans", "valid_floor_plans", "heldout_floor_plans")
OFFICIAL_ROOT = "json_2.1.1"
OFFICIAL_SPLITS = ("train", "valid_seen", "valid_unseen")


class AlfWorldConfig(BaseEnvConfig):
    """Config of the `alfworld` env and of its task splits."""

    task_types: list[TaskType] = Field(list(TASK_TYPES), min_length=1,
                                       description="which of the six task types to play")
    train_floor_plans: list[int] = Field(TRAIN_FLOOR_PLANS, description="rooms of train and heldout_seen")
    valid_floor_plans: list[int] = Field(VALID_FLOOR_PLANS, description="rooms of valid (tuning)")
    heldout_floor_plans: list[int] = Field(HELDOUT_FLOOR_PLANS, description="rooms of heldout (unseen)")
    train_size: int = Field(600, ge=0, description="games in the train split")
    heldout_size: int = Field(120, ge=0, description="games in each of valid, heldout and heldout_seen")
    seed: int = Field(0, ge=0, description="which draw of games: shifts every game seed")
    max_turns: int = Field(50, ge=1, description="turns before truncation (ALFWorld's own evaluation "
                                                 "budget is 50)")
    admissible_commands: bool = Field(False, description="end every observation with the admissible "
                                                         "commands (info['admissible_actions'] always has them)")
    source: Literal["generated", "official"] = Field(
        "generated", description="generated: games made here from the package's floor plans (cached); "
        "official: ALFWorld's released games under official_dir")
    official_dir: str | None = Field(None, description=f"folder holding {OFFICIAL_ROOT}/ (source: "
                                                        "official); default $ALFWORLD_DATA")
    cache_dir: str = Field("data/alfworld", description="generated games go under it")
    workers: int = Field(1, ge=1, description="parallel processes generating games")
    planner: Literal["expert", "fast_downward"] = Field(
        "expert", description="what plans the games (generation's check, the expert plans, dense rewards, "
        "demo detour recoveries): expert (expert.py, exact for the six task types, about a millisecond) "
        "or fast_downward (textworld's blind search: seconds to minutes in a kitchen)")
    game_time_limit: float | None = Field(
        120.0, gt=0, description="seconds one game may take to make and check (with planner fast_downward, "
        "long plans in big rooms can take minutes); slower games are dropped. None: no limit, "
        "and one worker generates in-process")
    progress: bool = Field(True, description="progress bar and summary line while generating")

    @field_validator("task_types")
    @classmethod
    def _distinct_types(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("a task type is listed twice")
        return value

    @field_validator(*FLOOR_PLAN_KEYS)
    @classmethod
    def _known_floor_plans(cls, value: list[int], info: ValidationInfo) -> list[int]:
        if not value:
            raise ValueError("the split has no floor plans (an empty split)")
        if len(set(value)) != len(value):
            raise ValueError("a floor plan is listed twice")
        missing = missing_floor_plans(value)
        if missing:
            where = (f"the installed alfworld package ({package_dir()}) has no gen/layouts/"
                     f"FloorPlan{missing[0]}-objects.json / -openable.json"
                     if package_dir() is not None else "not one of ALFRED's rooms")
            raise ValueError(f"floor plan(s) {missing}: {where}; rooms are 1-30 (kitchens), 201-230 "
                             "(living rooms), 301-330 (bedrooms), 401-430 (bathrooms)")
        types = info.data.get("task_types")
        if types and package_dir() is not None:
            from .problems import playable_task_types

            if not any(playable_task_types(n, types) for n in value):
                raise ValueError(f"none of these rooms can host any of the task types {types} (an "
                                 "empty split): e.g. heating and cooling need a kitchen, looking "
                                 "at an object in light a living room or bedroom with a lamp")
        return value

    @model_validator(mode="after")
    def _disjoint_rooms_and_official_folder(self) -> AlfWorldConfig:
        for i, a in enumerate(FLOOR_PLAN_KEYS):
            for b in FLOOR_PLAN_KEYS[i + 1:]:
                shared = sorted(set(getattr(self, a)) & set(getattr(self, b)))
                if shared:
                    raise ValueError(f"{a} and {b} share floor plans {shared}: splits must not share a room")
        if self.source == "official":
            root = self.official_root
            if not root.is_dir():
                raise ValueError(f"official_dir: {root} does not exist; source 'official' expects the "
                                 f"ALFWorld data as {OFFICIAL_ROOT}/{{{','.join(OFFICIAL_SPLITS)}}}/<task>/"
                                 "<trial>/game.tw-pddl (+ traj_data.json) under official_dir or "
                                 "$ALFWORLD_DATA")
        return self

    @property
    def official_root(self) -> Path:
        """<official_dir or $ALFWORLD_DATA>/json_2.1.1."""
        base = self.official_dir or os.environ.get("ALFWORLD_DATA") or "."
        return Path(base).expanduser().resolve() / OFFICIAL_ROOT
