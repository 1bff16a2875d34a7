"""A fast, exact planner for ALFWorld's six task types, from a game's PDDL state.

textworld's planner (fast-downward's `replan`) is a blind uniform-cost search over the whole
state: its time grows exponentially with the plan length and the room's size (seconds to minutes
in a kitchen). The task types have a fixed shape, so this planner searches a much smaller graph:

  state    where the agent is, what it holds (a target-type object, another object, nothing),
           where each object of the target type is, which receptacles are open, which targets
           are cleaned / heated / cooled, which lamps of the task's type have been switched on
  moves    macro actions, each one useful action with the moves it needs first: "take o from r"
           (go to r if not there, open r if closed), "move o to r" (the same), "clean/heat/cool
           o with a" (go to the appliance), "use lamp" (go to its stand), and, for the look task
           once a lamp is on, "go to" its stand

and runs A* over it with an admissible bound (the puts, takes and clean/heat/cool/switch-on the
goal still needs, plus a move when the last action cannot happen here), ties broken in a fixed
order, so the plan is a pure function of the state. Every other action of the domain is useless
for these goals (look, examine, inventory and close change nothing a goal or precondition reads;
taking a non-target object, or toggling anything but the task's lamp, leads nowhere), and an open
can always be moved to just before the take or put it serves, so a shortest plan of the real
game is a sequence of these macros: the search is exact, not a heuristic. Where an object is put
down only to free the hands, the candidates are the receptacles that hold a target or are goal
receptacles (opening one now can serve a later take or put), and of the others one per location
that matters (the agent's, a target's, a goal receptacle's, an appliance's, a lamp's; one
needing no open when there is one) plus one elsewhere — the rest are interchangeable with those.

Costs are those of the game's planner: without a `(:metric ...)` in the problem (the generated
games, and fast-downward's default) every action costs 1, so the plan is a shortest one; with a
metric, the domain's costs (clean/heat/cool/toggle 5, the rest 1), ties broken by length.
tests/test_alfworld.py checks the lengths against fast-downward's on sampled states.

The state is read from the running game (textworld's PDDL backend keeps the current facts in
`_pddl_state`; no planner call, no translation). plan() returns None for a goal it does not know
(the official data's sliced or movable-receptacle variants): callers fall back to fast-downward.
"""

from __future__ import annotations

import heapq
import itertools
import re
from dataclasses import dataclass

PROCESS = {"pick_clean_then_place_in_recep": ("clean", "sinkbasintype", "cleanable", "isclean"),
           "pick_heat_then_place_in_recep": ("heat", "microwavetype", "heatable", "ishot"),
           "pick_cool_then_place_in_recep": ("cool", "fridgetype", "coolable", "iscool")}
EXPENSIVE = 5  # the domain's cost of clean/heat/cool/toggle, under a metric
_TYPE_RE = re.compile(r"\((objecttype|receptacletype)\s+\?(\w+)\s+(\w+)\)", re.IGNORECASE)


@dataclass(frozen=True)
class Goal:
    """What a game asks, read from its PDDL goal: the task type and the (lower-case PDDL) types."""

    task_type: str
    obj: str  # e.g. "appletype"
    recep: str = ""  # "" for look_at_obj_in_light
    toggle: str = ""  # the lamp's type, look_at_obj_in_light only


def parse_goal(problem: str) -> Goal | None:
    """The Goal of a PDDL problem written from alfworld's goal library; None for any other goal
    (sliced objects, movable receptacles, a hand-written goal)."""
    text = problem[problem.lower().find("(:goal"):].lower() if "(:goal" in problem.lower() else ""
    if not text or "issliced" in text or "inreceptacleobject" in text:
        return None
    objects = {var: t for kind, var, t in _TYPE_RE.findall(text) if kind == "objecttype"}
    receps = {t for kind, _, t in _TYPE_RE.findall(text) if kind == "receptacletype"}
    if "istoggled" in text:
        if set(objects) != {"ot", "o"} or receps:
            return None
        return Goal("look_at_obj_in_light", objects["o"], toggle=objects["ot"])
    if len(receps) != 1 or len(set(objects.values())) != 1:
        return None
    obj, recep = next(iter(objects.values())), next(iter(receps))
    if "(not (= " in text:
        return Goal("pick_two_obj_and_place", obj, recep)
    for task_type, (_, _, _, done) in PROCESS.items():
        if done in text:
            return Goal(task_type, obj, recep)
    return Goal("pick_and_place_simple", obj, recep) if "inreceptacle" in text else None


class World:
    """The facts of one game state that the six goals and their actions read."""

    def __init__(self, facts, names: dict[str, str]):
        self.names = names  # PDDL id -> what commands call it ("apple 1")
        self.agent_at = ""
        self.rtype: dict[str, str] = {}
        self.rloc: dict[str, str] = {}
        self.otype: dict[str, str] = {}
        self.inside: dict[str, str] = {}
        self.held: str | None = None
        self.contain: set[tuple[str, str]] = set()
        self.props: dict[str, set[str]] = {}
        for fact in facts:
            name, args = fact.name, [a.name for a in fact.arguments]
            if name == "atlocation":
                self.agent_at = args[1]
            elif name == "receptacletype":
                self.rtype[args[0]] = args[1]
            elif name == "receptacleatlocation":
                self.rloc[args[0]] = args[1]
            elif name == "objecttype":
                self.otype[args[0]] = args[1]
            elif name == "inreceptacle":
                self.inside[args[0]] = args[1]
            elif name == "holds":
                self.held = args[1]
            elif name == "cancontain":
                self.contain.add((args[0], args[1]))
            elif len(args) == 1:
                self.props.setdefault(name, set()).add(args[0])

    def has(self, prop: str, entity: str) -> bool:
        return entity in self.props.get(prop, ())


def world_of(game) -> World:
    """The World of a running textworld game (PddlEnv, under any wrappers): its current facts."""
    backend = game.unwrapped
    names = {k: info.name for k, info in backend._entity_infos.items()}
    return World(backend._pddl_state.facts, names)


def uses_metric(game) -> bool:
    return ":metric" in game.unwrapped._pddl_state.pddl_problem.lower()


def goal_of(game) -> Goal | None:
    return parse_goal(game.unwrapped._pddl_state.pddl_problem)


def plan_game(game) -> list[str] | None:
    """The expert's plan from the game's current state ([] once won or when there is none), or
    None when the game's goal is not one of the six task types'."""
    goal = goal_of(game)
    if goal is None:
        return None
    return plan(world_of(game), goal, metric=uses_metric(game))


HELD_OTHER = -1  # `held` in the search state: a non-target object


def plan(world: World, goal: Goal, metric: bool = False) -> list[str]:
    """A cheapest command plan reaching `goal` from `world` (the game's costs: see the module
    docstring); [] when the goal holds already or cannot be reached."""
    return _Search(world, goal, metric).run()


class _Search:
    def __init__(self, world: World, goal: Goal, metric: bool):
        w, g = world, goal
        self.w, self.g, self.metric = w, g, metric
        self.process = PROCESS.get(g.task_type)
        self.targets = sorted(o for o, t in w.otype.items() if t == g.obj and w.has("pickupable", o)
                              and (self.process is None or w.has(self.process[2], o)))
        self.index = {o: i for i, o in enumerate(self.targets)}
        self.receps = sorted(w.rloc)
        self.goal_receps = [r for r in self.receps if g.recep and w.rtype.get(r) == g.recep
                            and (g.recep, g.obj) in w.contain]
        self.appliances = [r for r in self.receps if self.process and w.rtype.get(r) == self.process[1]]
        self.lamps = sorted(o for o, t in w.otype.items() if g.toggle and t == g.toggle
                            and w.has("toggleable", o) and o in w.inside)
        self.other = w.held if w.held is not None and w.held not in self.index else None
        self.goal_set = frozenset(self.goal_receps)

    # -- the search state: (loc, held, pos, opened, done, lit) ----------------------------------

    def start(self):
        w = self.w
        held = self.index.get(w.held, HELD_OTHER) if w.held is not None else None
        pos = tuple(w.inside.get(o) for o in self.targets)
        opened = frozenset(r for r in self.receps if w.has("opened", r))
        done = frozenset(i for i, o in enumerate(self.targets) if self.process and w.has(self.process[3], o))
        lit = frozenset(lamp for lamp in self.lamps if w.has("istoggled", lamp))
        return w.agent_at, held, pos, opened, done, lit

    def is_goal(self, state) -> bool:
        loc, held, pos, _, done, lit = state
        if self.g.task_type == "look_at_obj_in_light":
            return held is not None and held >= 0 and any(self.w.rloc[self.w.inside[lamp]] == loc for lamp in lit)
        placed = [(r, i) for i, r in enumerate(pos) if r in self.goal_set and (not self.process or i in done)]
        if self.g.task_type == "pick_two_obj_and_place":
            return any(sum(r == q for q, _ in placed) >= 2 for r, _ in placed)
        return bool(placed)

    def run(self) -> list[str]:
        if not self.targets:
            return []
        start = self.start()
        if self.is_goal(start):
            return []
        tick = itertools.count()
        best = {start: (0, 0)}
        parent: dict = {start: None}
        heap = [(self.bound(start), next(tick), (0, 0), start)]
        while heap:
            _, _, cost, state = heapq.heappop(heap)
            if best.get(state) != cost:
                continue
            if self.is_goal(state):
                return self._commands(parent, state)
            for step_cost, commands, nxt in self.moves(state):
                new = (cost[0] + step_cost[0], cost[1] + step_cost[1])
                if nxt not in best or new < best[nxt]:
                    best[nxt], parent[nxt] = new, (state, commands)
                    h = self.bound(nxt)
                    heapq.heappush(heap, ((new[0] + h[0], new[1] + h[1]), next(tick), new, nxt))
        return []

    def bound(self, state) -> tuple[int, int]:
        """A lower bound on the (cost, length) still to pay from `state` (A*'s heuristic; each
        part bounds both, so the order by cost then length stays exact): the puts, takes,
        clean/heat/cool or switch-on the goal still needs, a put to free the hands first, and a
        move when the agent is not where the last action must happen."""
        loc, held, pos, _, done, lit = state
        w, holding = self.w, held is not None and held != HELD_OTHER
        expensive = EXPENSIVE if self.metric else 1
        if self.g.task_type == "look_at_obj_in_light":
            takes, special = (0 if holding else 1), (0 if lit else 1)
            there = any(w.rloc[w.inside[lamp]] == loc for lamp in self.lamps)
            steps = takes + (held == HELD_OTHER) + (not there)
            return steps + special * expensive, steps + special
        if self.is_goal(state):
            return 0, 0
        if self.g.task_type == "pick_two_obj_and_place":
            most = max((sum(r == q for q in pos) for r in self.goal_set), default=0)
            puts = 2 - min(most, 1)
        else:
            puts = 1
        takes = max(puts - holding, 0)
        special = 1 if self.process and not done else 0
        there = any(w.rloc[r] == loc for r in self.goal_receps)
        steps = puts + takes + (held == HELD_OTHER and takes > 0) + (not there)
        return steps + special * expensive, steps + special

    @staticmethod
    def _commands(parent, state) -> list[str]:
        out = []
        while parent[state] is not None:
            state, commands = parent[state]
            out[:0] = commands
        return out

    # -- macro actions --------------------------------------------------------------------------

    def _name(self, entity: str) -> str:
        return self.w.names.get(entity, entity)

    def _approach(self, loc, opened, r, need_open: bool):
        """Commands (and their count) to stand at r's location, r opened if `need_open`."""
        commands = [] if self.w.rloc[r] == loc else [f"go to {self._name(r)}"]
        if need_open and self.w.has("openable", r) and r not in opened:
            commands.append(f"open {self._name(r)}")
            opened = opened | {r}
        return commands, opened

    def _cost(self, commands: list[str], expensive: bool = False):
        n = len(commands)
        return (n + (EXPENSIVE - 1 if expensive and self.metric else 0), n)

    def moves(self, state):
        loc, held, pos, opened, done, lit = state
        w, g = self.w, self.g
        if held is None:  # take a target object
            for i, r in enumerate(pos):
                if r is None:
                    continue
                commands, now_open = self._approach(loc, opened, r, True)
                commands.append(f"take {self._name(self.targets[i])} from {self._name(r)}")
                new_pos = pos[:i] + (None,) + pos[i + 1:]
                yield self._cost(commands), commands, (w.rloc[r], i, new_pos, now_open, done, lit)
        else:
            obj = self.other if held == HELD_OTHER else self.targets[held]
            for r in self._put_candidates(state, obj):
                commands, now_open = self._approach(loc, opened, r, True)
                commands.append(f"move {self._name(obj)} to {self._name(r)}")
                new_pos = pos if held == HELD_OTHER else pos[:held] + (r,) + pos[held + 1:]
                yield self._cost(commands), commands, (w.rloc[r], None, new_pos, now_open, done, lit)
            if self.process and held != HELD_OTHER and held not in done:
                verb = self.process[0]
                for a in self.appliances:
                    commands, _ = self._approach(loc, opened, a, False)
                    commands.append(f"{verb} {self._name(obj)} with {self._name(a)}")
                    yield self._cost(commands, True), commands, (w.rloc[a], held, pos, opened, done | {held}, lit)
        if g.task_type == "look_at_obj_in_light":
            for lamp in self.lamps:
                stand = w.inside[lamp]
                if lamp not in lit:
                    commands, _ = self._approach(loc, opened, stand, False)
                    commands.append(f"use {self._name(lamp)}")
                    yield self._cost(commands, True), commands, (w.rloc[stand], held, pos, opened, done, lit | {lamp})
                elif w.rloc[stand] != loc:
                    commands = [f"go to {self._name(stand)}"]
                    yield self._cost(commands), commands, (w.rloc[stand], held, pos, opened, done, lit)

    def _put_candidates(self, state, obj: str) -> list[str]:
        """Where the held object may go: a goal receptacle (a target, on a place task), or, to free
        the hands (a non-target; an unprocessed target, as a processed one may be elsewhere), any
        receptacle that holds a target or is a goal receptacle (opening it now may serve a later
        take or put), and of the others the cheapest at each location that matters and the
        cheapest one elsewhere (the rest are interchangeable with those)."""
        loc, held, pos, opened, done, _ = state
        w, g = self.w, self.g
        otype = w.otype.get(obj)
        fits = [r for r in self.receps if (w.rtype.get(r), otype) in w.contain]
        out = []
        is_target = held != HELD_OTHER
        if is_target and g.task_type != "look_at_obj_in_light":
            out = [r for r in self.goal_receps if r in fits]
        frees_hands = not is_target or (self.process is not None and held not in done)
        if not frees_hands:
            return out
        useful = {loc} | {w.rloc[r] for r in pos if r is not None}
        useful |= {w.rloc[r] for r in self.goal_receps + self.appliances}
        useful |= {w.rloc[w.inside[lamp]] for lamp in self.lamps}
        special = {r for r in pos if r is not None} | self.goal_set
        by_loc: dict[str, str] = {}
        elsewhere = None
        for r in fits:  # receps are sorted: ties go to the first name
            if r in special:
                if r not in out:
                    out.append(r)
                continue
            needs_open = w.has("openable", r) and r not in opened
            key = w.rloc[r] if w.rloc[r] in useful else None
            current = by_loc.get(key) if key is not None else elsewhere
            if current is None or (needs_open < (w.has("openable", current) and current not in opened)):
                if key is None:
                    elsewhere = r
                else:
                    by_loc[key] = r
        chosen = sorted(set(by_loc.values()) | ({elsewhere} if elsewhere else set()))
        return out + [r for r in chosen if r not in out]
