"""A searching expert: demos that look for what the task needs instead of walking to it.

The planner (expert.py, or fast-downward) plans from the game's full PDDL state, so its plan
walks straight to the one cabinet, of thirteen, that holds the apple. Imitating that in a room
never seen in training is guessing: nothing the policy can read says which cabinet. This expert
follows the planner only where its next step can be read from what the agent has seen: going to
a receptacle the task names or a tool (sink, microwave, fridge), or to where the object it wants
next (the one its plan takes or uses there) has already been seen; anything else is replaced by
a search step: go to the next receptacle not yet looked at, in the order of `SearchPrior` (the
receptacle types where the training games' plans took an object of that type, the commonest
first, then the rest of the room as the intro lists it), and open it when it is closed. An
object of the wanted type seen on the way is taken where it lies. Then the planner is asked
again from the new state, so a demo is always the planner's recovery from where the search left
it, and it wins if the planner's plan does.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from typing import Iterable

from ..textworld.demos import detour_command, flatten_demo
from ..textworld.env import ADMISSIBLE_PREFIX
from .env import AlfWorldEnv
from .layouts import room

_THING = re.compile(r"\b(?:a|an) ([a-z]+) (\d+)")
_TAKE = re.compile(r"^take ([a-z]+) (\d+) from ([a-z]+ \d+)$")
_USE = re.compile(r"^use ([a-z]+) (\d+)$")
_GO = re.compile(r"^go to ([a-z]+ \d+)$")
_OPEN = re.compile(r"^open ([a-z]+ \d+)$")
_HOLDER = re.compile(r"\bthe ([a-z]+ \d+)")


def kind(entity: str) -> str:
    """"cabinet 13" -> "cabinet"."""
    return entity.rsplit(" ", 1)[0]


class SearchPrior:
    """Where the training games' plans found objects of each type: per receptacle type, the
    games' share of takes (a lamp: of uses) there divided by how many of that type the room has
    (a take from one of 13 cabinets says less about each cabinet than one from the only
    countertop), and which types the plans had to open (a look inside costs two commands). Built
    from the train split only, so a held-out room adds nothing to it."""

    def __init__(self, tasks: Iterable[dict]) -> None:
        self.per_instance: dict[str, Counter] = defaultdict(Counter)
        self.opened: set[str] = set()
        for task in tasks:
            counts = room_counts(task.get("floor_plan"))
            at = None
            for step in task.get("walkthrough") or ():
                where = None
                if (m := _GO.match(step)) is not None:
                    at = m[1]
                elif step.startswith("open "):
                    self.opened.add(kind(step[5:]))
                elif (m := _TAKE.match(step)) is not None:
                    thing, where = m[1], m[3]
                elif (m := _USE.match(step)) is not None and at is not None:  # a lamp where it stands
                    thing, where = m[1], at
                if where is not None:
                    self.per_instance[thing][kind(where)] += 1.0 / counts.get(kind(where), 1)
        self.overall = Counter()
        for c in self.per_instance.values():
            self.overall.update(c)

    def order(self, thing: str, receptacles: list[str]) -> list[str]:
        """The room's receptacles in search order for an object type: by how likely each is to
        hold one per command it costs to look (then the same over all objects), ties in the
        order the room lists them."""
        mine = self.per_instance.get(thing, Counter())

        def key(i_r):
            i, r = i_r
            cost = 2.0 if kind(r) in self.opened else 1.0
            return (-mine[kind(r)] / cost, -self.overall[kind(r)] / cost, i)

        return [r for _, r in sorted(enumerate(receptacles), key=key)]


def room_counts(floor_plan) -> dict[str, int]:
    """How many receptacles of each type a generated game's room has (the package's floor plan;
    {} when unknown, e.g. an official game without one)."""
    if not isinstance(floor_plan, int):
        return {}
    try:
        _, points = room(floor_plan)
    except (OSError, AttributeError, TypeError):
        return {}
    out: Counter = Counter()
    for rid in points:
        parts = rid.split("|")
        out[(parts[4] if len(parts) > 4 else parts[0]).lower()] += 1
    return dict(out)


def room_receptacles(intro: str) -> list[str]:
    """The receptacles the intro lists ("you see a cabinet 13, a cabinet 12, ...")."""
    head = intro.split("Your task is to:")[0]
    return [f"{m[1]} {m[2]}" for m in _THING.finditer(head)]


def contents(reply: str) -> list[tuple[str, str]]:
    """(object, receptacle) for each object a reply shows: "On the shelf 2, you see a vase 1" /
    "You open the drawer 2. The drawer 2 is open. In it, you see a knife 1." (the receptacle is
    the last one named before "you see")."""
    out = []
    pieces = re.split(r"you see ", reply)
    for before, after in zip(pieces, pieces[1:]):
        holders = _HOLDER.findall(before)
        if holders:
            out += [(f"{m[1]} {m[2]}", holders[-1]) for m in _THING.finditer(after.split(".")[0])]
    return out


def searching_demonstration(env: AlfWorldEnv, task: dict, prior: SearchPrior, detour_rng=None) -> dict:
    """Play `task` with the searching expert (above); with `detour_rng`, one random admissible
    command at a random turn (marked {"expert": False}), as the planner's demos take."""
    obs, info = env.reset(options={"task": task})
    goal_words = set(re.findall(r"[a-z]+", task.get("goal") or obs.split("Your task is to:")[-1]))
    receptacles = room_receptacles(obs)
    seen: dict[str, str] = {}  # object "apple 2" -> the receptacle it was last seen at
    looked: set[str] = set()
    here, turns = None, []
    detour_at = detour_rng.randrange(max(len(task.get("walkthrough") or []), 1)) if detour_rng else None
    won = done = False
    while not done:
        plan = env.expert_plan()
        if not plan:
            break
        action, expert = _next(plan, here, seen, looked, receptacles, goal_words, prior, info), True
        if detour_at is not None and len(turns) == detour_at:
            detour = detour_command(detour_rng, info["admissible_actions"], action)
            if detour is not None:
                action, expert = detour, False
        turns.append({"observation": obs, "action": action, **({} if expert else {"expert": False})})
        obs, _, won, truncated, info = env.step(action)
        done = won or truncated
        if (m := _GO.match(action)) is not None and "Nothing happens" not in obs:
            here = m[1]
            looked.add(here)
        for thing, holder in contents(obs.split(ADMISSIBLE_PREFIX)[0]):
            seen[thing] = holder
        if action.startswith("take "):
            seen.pop(" ".join(action.split()[1:3]), None)
    demo = {"turns": turns, "final_observation": obs, "won": bool(won), "score": int(won), "max_score": 1,
            "task": dict(task)}
    return {**demo, **flatten_demo(demo)}


def _next(plan, here, seen, looked, receptacles, goal_words, prior, info) -> str:
    """The expert's next command: the planner's when it can be read from what was seen, else a
    search step."""
    step = plan[0]
    go, take, use, opening = _GO.match(step), _TAKE.match(step), _USE.match(step), _OPEN.match(step)
    if go is not None:
        target = go[1]
        wanted = _wanted_at(plan[1:], target)
        if wanted is None or seen.get(wanted) == target:  # to place, clean, heat, cool; or to what it saw
            return step
    elif take is not None and take[3] != here:  # from a receptacle beside this one
        wanted = f"{take[1]} {take[2]}"
    elif opening is not None and opening[1] != here:  # the planner reaches into the next drawer
        wanted = _wanted_at(plan[1:], opening[1])
        if wanted is None:
            return step
    elif use is not None and f"{use[1]} {use[2]}" not in seen:
        wanted = f"{use[1]} {use[2]}"
    else:
        return step  # take, open, clean, heat, cool, use, move: about what is here
    if seen.get(wanted) not in (None, here):
        return f"go to {seen[wanted]}"  # seen there: go and take it as the plan does
    thing = kind(wanted)
    # one of that type already seen: fetch it (take it at once when it is here)
    for obj, where in seen.items():
        if kind(obj) == thing and kind(where) not in goal_words:  # not one already put in place
            take = f"take {obj} from {where}"
            if where == here and take in info["admissible_actions"]:
                return take
            if where != here:
                return f"go to {where}"
    if here is not None and f"open {here}" in info["admissible_actions"]:
        return f"open {here}"  # look inside what is closed before moving on
    for r in prior.order(thing, receptacles):
        if r not in looked and f"go to {r}" in info["admissible_actions"]:
            return f"go to {r}"
    return step  # looked everywhere: follow the planner


def _wanted_at(rest: list[str], target: str) -> str | None:
    """The object the plan takes or uses at `target` after going there (None: it only places,
    cleans, heats ... there)."""
    for step in rest:
        if _GO.match(step):
            return None
        if (m := _TAKE.match(step)) is not None and m[3] == target:
            return f"{m[1]} {m[2]}"
        if (m := _USE.match(step)) is not None:
            return f"{m[1]} {m[2]}"
    return None
