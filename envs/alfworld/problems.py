"""One ALFWorld game from one real floor plan: task parameters, the PDDL problem, the .tw-pddl file.

A game is what ALFWorld's own pipeline writes (`game.tw-pddl`): {"pddl_domain": alfred.pddl,
"grammar": alfred.twl2 with the task text in place of "UNKNOWN GOAL", "pddl_problem": ...}.
ALFWorld makes its problems from AI2-THOR scenes it runs; here they are made from the files the
package ships, with ALFRED's own rules, for each (task type, floor plan, seed):

  receptacles  the receptacle instances of FloorPlanN-openable.json, at their own interaction
               points; a receptacle type the room has (FloorPlanN-objects.json) but that file
               does not place (stove burners, coffee machines, sink basins, ...) gets one
               instance at a location of its own (a basin as "Sink|1|SinkBasin", the form
               ALFWorld's demangler reads as "sinkbasin 1"). Fridges, cabinets, drawers, ...
               start closed.
  objects      every pickupable type of the room (those ALFRED lets some receptacle hold),
               1..MAX_NUM_OF_OBJ_INSTANCES instances, each in a random receptacle that can hold
               it (VAL_RECEPTACLE_OBJECTS); lamps stand on a random table/desk/dresser
  task         ALFRED's constraints (generate_trajectories.py): the scene types a goal is valid
               in (GOALS_VALID), the pickup property it needs (cleanable / heatable / coolable),
               the appliance it needs (sink basin / microwave / fridge / lamp), the receptacles
               it may not use (not the microwave for a heat task, ...), a receptacle that can
               hold the object; 1..PICKUP_REPEAT_MAX instances of the target object (2.. for
               the two-object task), none of them starting where the goal wants them
  goal         the goal's PDDL and its text from alfworld.gen.goal_library (a template drawn by
               the seed, as ALFWorld draws one per game)

The agent starts in the middle of the room (a location no receptacle is at). Everything is drawn
from random.Random keyed by (task type, floor plan, seed), so a game is a pure function of them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from .layouts import import_alfworld, room, scene_type

# ALFRED's task-sampling rules (alfworld/gen/scripts/generate_trajectories.py, not in the wheel)
PICKUP_PROPERTY = {"pick_heat_then_place_in_recep": "Heatable", "pick_cool_then_place_in_recep": "Coolable",
                   "pick_clean_then_place_in_recep": "Cleanable"}
INVALID_RECEPTACLES = {"pick_heat_then_place_in_recep": {"Microwave"},
                       "pick_cool_then_place_in_recep": {"Fridge"},
                       "pick_clean_then_place_in_recep": {"SinkBasin"},
                       "pick_two_obj_and_place": {"CoffeeMachine", "ToiletPaperHanger", "HandTowelHolder"}}
# The appliance the task's domain action needs (CleanObject: SinkBasinType, ...)
APPLIANCE = {"pick_clean_then_place_in_recep": "SinkBasin", "pick_heat_then_place_in_recep": "Microwave",
             "pick_cool_then_place_in_recep": "Fridge"}
LAMPS = ("DeskLamp", "FloorLamp")
# No receptacle type "holds" a lamp in ALFRED's tables; in the rooms they stand on (or by) these.
LAMP_STANDS = ("Desk", "SideTable", "Dresser", "DiningTable", "CoffeeTable", "TVStand", "Shelf", "CounterTop")
# Where a structure's basin gets its interaction point (AI2-THOR names a basin "Sink|...|SinkBasin").
BASIN_OF = {"SinkBasin": "Sink", "BathtubBasin": "Bathtub"}
# PDDL names cannot hold these characters; ALFWorld's own mangling (fix_pddl_str_chars), which its
# AlfredDemangler undoes into "apple 1".
PDDL_CHARS = {"-": "_minus_", "|": "_bar_", "+": "_plus_", ".": "_dot_", ",": "_comma_"}
START = "loc|start"


def constants():
    import_alfworld()
    import alfworld.gen.constants as C

    return C


def goal_library():
    import_alfworld()
    import alfworld.gen.goal_library as glib

    return glib.gdict


def pddl_name(text: str) -> str:
    return "".join(PDDL_CHARS.get(ch, ch) for ch in text)


@functools.cache
def _pickupable() -> frozenset[str]:
    """Object types that some receptacle can hold: the ones an agent can carry."""
    C = constants()
    held = set().union(*C.VAL_RECEPTACLE_OBJECTS.values())
    return frozenset(t for t in C.OBJECTS if t in held and not t.endswith("Sliced"))


@functools.cache
def _room_kinds(floor_plan: int) -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
    """(static receptacle types, pickupable object types, lamp types) in the room."""
    C = constants()
    types, points = room(floor_plan)
    static = {t for t in types if t in C.RECEPTACLES and t not in C.MOVABLE_RECEPTACLES_SET}
    static |= {rid.split("|")[0] for rid in points if rid.split("|")[0] in C.RECEPTACLES
               and rid.split("|")[0] not in C.MOVABLE_RECEPTACLES_SET}
    holdable = {t for t in types if t in _pickupable()
                and any(t in C.VAL_RECEPTACLE_OBJECTS.get(r, ()) for r in static)}
    lamps = {t for t in LAMPS if t in types} if static & set(LAMP_STANDS) else set()
    return frozenset(static), frozenset(holdable), frozenset(lamps)


@dataclass(frozen=True)
class TaskParams:
    """ALFRED's pddl_params of one game, plus where it is."""

    task_type: str
    object_target: str
    parent_target: str  # "" for look_at_obj_in_light
    toggle_target: str  # "" but for look_at_obj_in_light
    floor_plan: int

    def traj_data(self) -> dict:
        """The fields of ALFRED's traj_data.json that ALFWorld reads (task type, targets, scene)."""
        return {"task_type": self.task_type,
                "pddl_params": {"object_target": self.object_target, "parent_target": self.parent_target,
                                "toggle_target": self.toggle_target, "mrecep_target": "",
                                "object_sliced": False},
                "scene": {"floor_plan": f"FloorPlan{self.floor_plan}", "scene_num": self.floor_plan}}


def _candidates(task_type: str, floor_plan: int) -> list[tuple[str, str, str]]:
    """Every (object, receptacle, lamp) ALFRED's rules allow for this task in this room."""
    C = constants()
    if scene_type(floor_plan) not in C.GOALS_VALID[task_type]:
        return []
    static, holdable, lamps = _room_kinds(floor_plan)
    if task_type in APPLIANCE and APPLIANCE[task_type] not in static:
        return []
    objects = sorted(holdable)
    if task_type in PICKUP_PROPERTY:
        objects = [o for o in objects if o in C.VAL_ACTION_OBJECTS[PICKUP_PROPERTY[task_type]]]
    if task_type == "look_at_obj_in_light":
        return [(o, "", lamp) for lamp in sorted(lamps) for o in objects]
    bad = INVALID_RECEPTACLES.get(task_type, set())
    return [(o, r, "") for o in objects for r in sorted(static - bad) if o in C.VAL_RECEPTACLE_OBJECTS[r]]


def playable_task_types(floor_plan: int, task_types) -> list[str]:
    """The task types (of `task_types`) that this room can host at all."""
    return [t for t in task_types if _candidates(t, floor_plan)]


def sample_params(task_type: str, floor_plan: int, rng: random.Random) -> TaskParams | None:
    """The task's targets: an object type first (so rooms with many receptacles do not favour
    their objects), then a receptacle or lamp for it. None if the room cannot host the task."""
    options = _candidates(task_type, floor_plan)
    if not options:
        return None
    obj = rng.choice(sorted({o for o, _, _ in options}))
    _, recep, lamp = rng.choice([c for c in options if c[0] == obj])
    return TaskParams(task_type, obj, recep, lamp, floor_plan)


def _location(point: tuple) -> str:
    x, z, rotation, horizon = point
    return f"loc|{round(x * 4)}|{round(z * 4)}|{int(rotation)}|{int(horizon)}"  # 0.25 m grid units


def _receptacles(floor_plan: int) -> dict[str, tuple[str, str]]:
    """{receptacle id: (type, location)} for the room's static receptacles."""
    static, _, _ = _room_kinds(floor_plan)
    _, points = room(floor_plan)
    out: dict[str, tuple[str, str]] = {}
    for index, rtype in enumerate(sorted(static)):
        ids = [rid for rid in points if rid.split("|")[0] == rtype]
        if ids:
            out.update({rid: (rtype, _location(points[rid])) for rid in ids})
            continue
        structure = [rid for rid in points if rid.split("|")[0] == BASIN_OF.get(rtype)]
        if structure:  # a basin reached from its sink's (bathtub's) point
            out[f"{structure[0]}|{rtype}"] = (rtype, _location(points[structure[0]]))
        elif rtype in BASIN_OF:  # "Sink|1|SinkBasin": ALFWorld's demangler names it "sinkbasin 1"
            out[f"{BASIN_OF[rtype]}|1|{rtype}"] = (rtype, f"loc|gen|{index}")
        else:
            out[f"{rtype}|1"] = (rtype, f"loc|gen|{index}")
    return out


def build_game(task_type: str, floor_plan: int, seed: int) -> dict | None:
    """The .tw-pddl game (a JSON-able dict, plus "params": the TaskParams as a dict), or None when
    the room cannot host the task type."""
    C = constants()
    rng = random.Random(f"alfworld-game/{task_type}/{floor_plan}/{seed}")
    params = sample_params(task_type, floor_plan, rng)
    if params is None:
        return None
    receptacles = _receptacles(floor_plan)
    _, holdable, lamps = _room_kinds(floor_plan)
    goal_types = {params.parent_target} if params.parent_target else set()

    def holders(otype: str, avoid: set[str]) -> list[str]:
        return [rid for rid, (rtype, _) in receptacles.items()
                if otype in C.VAL_RECEPTACLE_OBJECTS.get(rtype, ()) and rtype not in avoid]

    placed: list[tuple[str, str, str]] = []  # (object id, type, receptacle id)
    for otype in sorted(holdable):
        if otype == params.object_target:
            low = 2 if task_type == "pick_two_obj_and_place" else 1
            count, where = rng.randint(low, C.PICKUP_REPEAT_MAX), holders(otype, goal_types)
        else:
            count, where = rng.randint(1, C.MAX_NUM_OF_OBJ_INSTANCES), holders(otype, set())
        if not where:
            if otype == params.object_target:
                return None
            continue
        placed += [(f"{otype}|{k}", otype, rng.choice(where)) for k in range(1, count + 1)]
    stands = [rid for rid, (rtype, _) in receptacles.items() if rtype in LAMP_STANDS]
    for lamp in sorted(lamps):
        placed.append((f"{lamp}|1", lamp, rng.choice(stands)))

    templates = goal_library()[task_type]["templates"]
    text = rng.choice(templates).format(obj=params.object_target.lower(), recep=params.parent_target.lower(),
                                        toggle=params.toggle_target.lower(), mrecep="")
    problem = _problem(f"{task_type}_{floor_plan}_{seed}", params, receptacles, placed)
    info = import_alfworld()
    grammar = Path(info.ALFRED_TWL2_PATH).read_text(encoding="utf-8").replace("UNKNOWN GOAL", text)
    domain = Path(info.ALFRED_PDDL_PATH).read_text(encoding="utf-8")
    return {"pddl_domain": domain, "grammar": grammar, "pddl_problem": problem, "goal": text,
            "params": asdict(params)}


def _problem(name: str, params: TaskParams, receptacles: dict[str, tuple[str, str]],
             placed: list[tuple[str, str, str]]) -> str:
    C = constants()
    static_types = sorted(C.RECEPTACLES - C.MOVABLE_RECEPTACLES_SET)
    object_types = sorted(C.OBJECTS_SET - set(static_types))
    locations = sorted({loc for _, loc in receptacles.values()} | {START})
    room_types = {t for t, _ in receptacles.values()}
    held_types = sorted({t for _, t, _ in placed})
    facts = [f"(atLocation agent1 {START})"]
    for rid, (rtype, loc) in receptacles.items():
        facts += [f"(receptacleType {rid} {rtype}Type)", f"(receptacleAtLocation {rid} {loc})"]
        if rtype in C.OPENABLE_CLASS_SET:
            facts.append(f"(openable {rid})")
    facts += [f"(canContain {rtype}Type {otype}Type)" for rtype in sorted(room_types)
              for otype in held_types if otype in C.VAL_RECEPTACLE_OBJECTS.get(rtype, ())]
    properties = {"cleanable": "Cleanable", "heatable": "Heatable", "coolable": "Coolable",
                  "toggleable": "Toggleable", "sliceable": "Sliceable"}
    for oid, otype, rid in placed:
        facts += [f"(objectType {oid} {otype}Type)", f"(inReceptacle {oid} {rid})",
                  f"(objectAtLocation {oid} {receptacles[rid][1]})"]
        if otype in _pickupable():
            facts.append(f"(pickupable {oid})")
        if otype in C.MOVABLE_RECEPTACLES_SET:
            facts.append(f"(isReceptacleObject {oid})")
        facts += [f"({pred} {oid})" for pred, prop in properties.items() if otype in C.VAL_ACTION_OBJECTS[prop]]
    goal = goal_library()[params.task_type]["pddl"].format(
        obj=params.object_target, recep=params.parent_target, toggle=params.toggle_target, mrecep="")
    objects = (["agent1 - agent"] + [f"{t}Type - otype" for t in object_types]
               + [f"{t}Type - rtype" for t in static_types] + [f"{oid} - object" for oid, _, _ in placed]
               + [f"{rid} - receptacle" for rid in receptacles] + [f"{loc} - location" for loc in locations])
    lines = "\n        ".join
    text = (f"(define (problem plan_{name})\n(:domain alfred)\n(:objects\n        {lines(objects)}\n)\n"
            f"(:init\n        {lines(facts)}\n)\n")
    # The library's goals use "#" for PDDL's "-" (its own mangling) and close the define.
    return pddl_name(text.replace(" - ", " # ")).replace(" # ", " - ") + goal.replace("#", "-")


def game_hash(game: dict) -> str:
    """Identity of a game's content (problem and task text), not of how it was made."""
    blob = json.dumps({k: game.get(k) for k in ("pddl_problem", "grammar")}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]
