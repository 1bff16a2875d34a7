"""Offline ALFWorld game generation, checked by a planner, with a per-game cache.

A game is made per (task type, floor plan, seed) by problems.build_game, written as `.tw-pddl`,
then played through textworld's PDDL backend with ALFWorld's wrappers: it is kept only if the
planner finds a plan from the start and replaying that plan command by command wins. The planner
(`planner` in the config) is `expert` (expert.py: an exact search for the six task types, about
a millisecond) or `fast_downward` (textworld's `policy_commands`, a blind search: seconds to
minutes in a kitchen). The cache folder (one per generator version, and per planner, since the
plan is part of the game file) holds per game (file stem `<task type>-FloorPlan<N>-seed<seed>`):

  <stem>.tw-pddl        the game (ALFWorld's format, plus the expert plan as "walkthrough")
  <stem>.meta.json      ours: task type, floor plan, seed, targets, goal text, plan, game_hash
  <stem>.dropped.json   instead of the two above when the game was dropped: why

plus `settings.json`. As in envs/textworld, the .meta.json / .dropped.json is written last by
atomic rename, so a killed run leaves no half game and a second run makes only missing games.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing import get_context
from multiprocessing.connection import wait
from pathlib import Path
from typing import Iterable

from ..textworld.generate import FAILED, KEPT, GameCache, GenerationReport, _write_json_atomic
from .expert import plan_game
from .layouts import alfworld_version, import_alfworld
from .problems import build_game, constants, game_hash

# Bump when a change to problems.py (or to a planner) changes the games a (task type, floor plan,
# seed) gives. 2: the expert planner (its plans, and no game dropped for the planner's time);
# a basin without its sink's point named "sinkbasin 1", not "sinkbasinbasin 1".
GEN_FORMAT = 2
PLANNERS = ("expert", "fast_downward")
SETTINGS_FILE = "settings.json"
GameKey = tuple[str, int, int]  # (task type, floor plan, seed)


def stem(task_type: str, floor_plan: int, seed: int) -> str:
    return f"{task_type}-FloorPlan{floor_plan}-seed{seed:07d}"


# Problems whose PDDL -> SAS translation a process keeps (a kitchen's is a few MB).
TRANSLATIONS_KEPT = 256
# Whether games started from now on get fast-downward's own (optimized) translation for its
# replanner: start_game sets it from its planner. The expert never calls the replanner, so its
# games reuse the plain translation (one translation less per game: about a second in a
# kitchen); fast-downward can still plan on that one (the same plans, slower) should the expert
# fall back to it, or a game started for fast-downward be reset after one started for the expert.
_OPTIMIZED_REPLAN = [True]


@functools.cache
def _translate_once_per_problem() -> None:
    """Make textworld's PDDL backend translate each problem once per process. PddlEnv translates
    the problem (PDDL -> SAS, in Python: about a second for a kitchen) twice on load (once for
    playing, once optimized for its replanner) and again on every reset; the result depends only
    on the texts, and the backend reads it without changing it."""
    import fast_downward

    translate = fast_downward.pddl2sas

    @functools.lru_cache(maxsize=TRANSLATIONS_KEPT)
    def translated(domain: str, problem: str, verbose: bool, optimize: bool):
        argv = list(sys.argv)  # the translator overwrites sys.argv for its option parser
        try:
            return translate(domain, problem, verbose=verbose, optimize=optimize)
        finally:
            sys.argv[:] = argv

    def pddl2sas(domain: str, problem: str, verbose: bool = False, optimize: bool = False):
        return translated(domain, problem, verbose, optimize and _OPTIMIZED_REPLAN[0])

    fast_downward.pddl2sas = pddl2sas


# textworld's own functions that _parse_templates_once replaced (the test puts them back)
TEXTWORLD_ORIGINALS: dict = {}


@functools.cache
def _parse_templates_once() -> None:
    """Make textworld's PDDL backend parse each text template once per process. Every step it
    derives the text of every admissible command and of the feedback from the grammar, parsing
    each template and each of its conditions again with tatsu (most of a step's time: about
    0.1-0.2 s in a kitchen); a parse depends only on the text. The parsed symbols are copied out
    (derive() writes into them), the parsed queries (read-only) are shared. And its contexts are
    copied a level deep, not deep-copied: derive() only adds keys to their `variables` and
    `mapping` dicts, never changes the entities in them. (tests/test_alfworld.py plays a game with
    and without these and compares every text.)"""
    import textworld.envs.pddl.textgen as textgen
    from textworld.logic import Rule

    parse_symbols, parse_query = textgen._parse_and_convert, Rule.parse_conjunctive_query.__func__
    TEXTWORLD_ORIGINALS.update({(textgen, "_parse_and_convert"): parse_symbols,
                                (textgen, "copy_context"): textgen.copy_context,
                                (Rule, "parse_conjunctive_query"): Rule.__dict__["parse_conjunctive_query"]})

    def copy_context(context):
        return {"state": context["state"], "facts": context["facts"], "variables": dict(context["variables"]),
                "mapping": dict(context["mapping"]), "entity_infos": context["entity_infos"]}

    @functools.lru_cache(maxsize=4096)
    def parsed_symbols(text: str, rule_name: str):
        return parse_symbols(text, rule_name=rule_name)

    def cached_symbols(text, rule_name="start", trace=False, **kwargs):
        if trace or kwargs or not isinstance(text, str):
            return parse_symbols(text, rule_name=rule_name, trace=trace, **kwargs)
        return copy.deepcopy(parsed_symbols(text, rule_name))

    @functools.lru_cache(maxsize=4096)
    def parsed_query(cls, expr: str):
        return parse_query(cls, expr)

    textgen._parse_and_convert = cached_symbols
    textgen.copy_context = copy_context
    Rule.parse_conjunctive_query = classmethod(parsed_query)


def start_game(path: str, planner: str = "expert"):
    """A textworld env playing one .tw-pddl game the way ALFWorld does: the PDDL backend under
    AlfredDemangler (entity names read "apple 1") and AlfredInfos, admissible commands listed.
    `planner`: the one that will plan in it (for fast_downward, its replanner gets its own
    optimized translation of the problem)."""
    import_alfworld()
    import textworld
    from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredInfos

    _translate_once_per_problem()
    _parse_templates_once()
    _OPTIMIZED_REPLAN[0] = planner != "expert"
    infos = textworld.EnvInfos(feedback=True, won=True, admissible_commands=True, extras=["gamefile"])
    return textworld.start(path, infos, wrappers=[AlfredDemangler(shuffle=False), AlfredInfos])


def fast_downward_plan(game) -> list[str]:
    """fast-downward's plan from the game's current state, as commands; [] if it finds none. What
    textworld computes as `policy_commands` after every step when asked: a blind uniform-cost
    search, from 0.1 s to minutes in a kitchen."""
    backend = game.unwrapped
    return list(backend._pddl_state.replan(backend._entity_infos))


def plan_from_here(game, planner: str = "expert") -> list[str]:
    """A shortest plan from the game's current state, as commands; [] when won or when there is
    none. `expert` (expert.py, exact for the six task types; a game with any other goal falls back
    to fast-downward) or `fast_downward`."""
    if planner not in PLANNERS:
        raise ValueError(f"unknown planner {planner!r}; expected one of {list(PLANNERS)}")
    if planner == "expert":
        plan = plan_game(game)
        if plan is not None:
            return plan
    return fast_downward_plan(game)


def check_game(path: str, planner: str = "expert") -> dict:
    """Replay the planner's plan from the start; {status, reason, walkthrough}."""
    env = start_game(path, planner)
    try:
        state = env.reset()
        if state.won:
            return {"status": FAILED, "reason": "won before any move"}
        plan = plan_from_here(env, planner)
        if not plan:
            return {"status": FAILED, "reason": "the planner found no plan"}
        if len(plan) > constants().PLANNER_MAX_STEPS:
            return {"status": FAILED, "reason": f"the plan has {len(plan)} steps (ALFRED keeps <= "
                                                f"{constants().PLANNER_MAX_STEPS})"}
        for i, command in enumerate(plan):
            if command not in state.admissible_commands:
                return {"status": FAILED, "reason": f"plan step {i + 1} {command!r} is not admissible"}
            state, _, _ = env.step(command)
            if state.won:
                return {"status": KEPT, "reason": "", "walkthrough": plan[: i + 1]}
        return {"status": FAILED, "reason": f"the plan ({len(plan)} commands) does not win"}
    finally:
        env.close()


def generate_one(task_type: str, floor_plan: int, seed: int, folder: str, planner: str = "expert") -> dict:
    """Make and check one game; write it (or a dropped record) to `folder`. Returns the record
    written plus `seconds`."""
    start = time.perf_counter()
    out, name = Path(folder), stem(task_type, floor_plan, seed)
    base = {"format": GEN_FORMAT, "key": name, "task_type": task_type, "floor_plan": floor_plan, "seed": seed,
            "planner": planner}
    game = build_game(task_type, floor_plan, seed)
    if game is None:
        check = {"status": FAILED, "reason": f"FloorPlan{floor_plan} cannot host {task_type}"}
    else:
        params, goal = game.pop("params"), game.pop("goal")
        tmp = out / f".{name}.{os.getpid()}.tw-pddl"
        tmp.write_text(json.dumps({**game, "solvable": True}), encoding="utf-8")
        try:
            check = check_game(str(tmp), planner)
        except (OSError, ImportError):
            tmp.unlink(missing_ok=True)
            raise  # the machine's problem, not this game's: record nothing
        except Exception as e:  # the backend refused this problem: drop it, say why
            check = {"status": FAILED, "reason": f"{type(e).__name__}: {e}"[:500]}
    seconds = time.perf_counter() - start
    if check["status"] != KEPT:
        if game is not None:
            tmp.unlink(missing_ok=True)
        record = {**base, "status": check["status"], "reason": check["reason"], "seconds": round(seconds, 3)}
        _write_json_atomic(out / f"{name}.dropped.json", record)
        return {**record, "seconds": seconds}
    game = {**game, "solvable": True, "walkthrough": check["walkthrough"]}
    tmp.write_text(json.dumps(game), encoding="utf-8")
    os.replace(tmp, out / f"{name}.tw-pddl")
    record = {**base, "status": KEPT, "walkthrough": check["walkthrough"], "goal": goal, "params": params,
              "game_hash": game_hash(game), "alfworld_version": alfworld_version(), "seconds": round(seconds, 3)}
    _write_json_atomic(out / f"{name}.meta.json", record)  # last: marks the game as done
    return {**record, "seconds": seconds}


@dataclass
class AlfWorldReport(GenerationReport):
    """What one AlfWorldGames.generate() call did (textworld's report; every drop is a failure)."""

    reasons: Counter = field(default_factory=Counter)  # why games were dropped, by kind

    def __str__(self) -> str:
        why = "; ".join(f"{n} {r}" for r, n in self.reasons.most_common(3))
        return (f"alfworld {self.label}: generated {self.generated} games in {self.seconds:.1f} s = "
                f"{self.games_per_s:.2f} games/s ({self.workers} worker{'s' if self.workers != 1 else ''}); "
                f"kept {self.kept}, dropped {self.dropped}" + (f" ({why})" if why else ""))


def _reason_kind(reason: str) -> str:
    """A drop reason without its particulars ("plan step N ... is not admissible")."""
    return reason.split(":")[0].split(" '")[0][:60]


class AlfWorldGames(GameCache):
    """The cache folder of generated games: which are done, and generating missing ones.
    TextWorld's per-seed cache (its file protocol, its keep_rate), keyed by game stem."""

    def __init__(self, cache_dir: str | Path, planner: str = "expert"):
        if planner not in PLANNERS:
            raise ValueError(f"unknown planner {planner!r}; expected one of {list(PLANNERS)}")
        # one folder per generator version and planner (the plan is part of the game file)
        suffix = "" if planner == "expert" else f"-{planner}"
        self.folder = Path(cache_dir).expanduser().resolve() / f"generated-v{GEN_FORMAT}{suffix}"
        self.planner = planner
        self._records: dict[str, dict] | None = None

    def ensure_folder(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / SETTINGS_FILE
        if not path.exists():
            _write_json_atomic(path, {"format": GEN_FORMAT, "planner": self.planner,
                                      "alfworld_version": alfworld_version()})

    def records(self) -> dict[str, dict]:
        """{stem: record} of every game done (kept or dropped), read once then kept updated."""
        if self._records is None:
            self._records = {}
            for path in sorted(self.folder.glob("*.json")) if self.folder.is_dir() else []:
                if path.name.endswith((".meta.json", ".dropped.json")):
                    record = json.loads(path.read_text(encoding="utf-8"))
                    if record["status"] == KEPT and not self.game_path(record["key"]).exists():
                        continue  # the game file went missing: make it again
                    self._records[record["key"]] = record
        return self._records

    def game_path(self, name: str) -> Path:
        return self.folder / f"{name}.tw-pddl"

    def generate(self, keys: Iterable[GameKey], workers: int = 1, progress: bool = True,
                 label: str = "", time_limit: float | None = None) -> AlfWorldReport:
        """Generate the games of `keys` not done yet (dropping any that take more than
        `time_limit` seconds); prints the summary line."""
        self.ensure_folder()
        records = self.records()
        todo = [k for k in dict.fromkeys(keys) if stem(*k) not in records]
        report = AlfWorldReport("alfworld", label, workers=workers)
        if not todo:
            return report
        from tqdm.auto import tqdm

        start = time.perf_counter()
        bar = tqdm(total=len(todo), desc=f"alfworld {label}".strip(), unit="game", disable=not progress,
                   file=sys.stderr)
        try:
            for record in _run(todo, str(self.folder), workers, time_limit, self.planner):
                record.pop("seconds", None)
                records[record["key"]] = record
                report.generated += 1
                if record["status"] == KEPT:
                    report.kept += 1
                else:
                    report.failed += 1
                    report.reasons[_reason_kind(record["reason"])] += 1
                bar.update(1)
                bar.set_postfix(kept=report.kept, dropped=report.dropped, refresh=False)
        finally:
            bar.close()
        report.seconds = time.perf_counter() - start
        if progress:
            print(str(report), file=sys.stderr, flush=True)
        return report


def _run(keys: list[GameKey], folder: str, workers: int, time_limit: float | None, planner: str = "expert"):
    """Records of generate_one over keys: in-process for one worker without a time limit, else in
    spawned worker processes, one game at a time each. A game that takes longer than `time_limit`
    seconds (fast-downward is a blind search: a nine-step plan in a big room can take minutes) is
    dropped: its worker is stopped and replaced."""
    if time_limit is None and (workers <= 1 or len(keys) == 1):
        for key in keys:
            yield generate_one(*key, folder, planner)
        return
    ctx = get_context("spawn")
    todo, busy, idle = list(reversed(keys)), {}, []  # busy: worker -> (key, started)
    try:
        while todo or busy:
            while todo and len(busy) < workers:
                worker = idle.pop() if idle else _Worker(ctx)
                key = todo.pop()
                worker.conn.send((key, folder, planner))
                busy[worker] = (key, time.monotonic())
            ready = wait([w.conn for w in busy], timeout=1.0)
            for worker in [w for w in busy if w.conn in ready]:
                key, _ = busy.pop(worker)
                kind, payload = worker.conn.recv()
                if kind == "error":
                    raise RuntimeError(f"alfworld generation of {stem(*key)} failed: {payload}")
                idle.append(worker)
                yield payload
            for worker, (key, started) in list(busy.items()):
                if time_limit is not None and time.monotonic() - started > time_limit:
                    del busy[worker]
                    worker.stop()
                    yield _timed_out(key, folder, time.monotonic() - started, time_limit, planner)
    finally:
        for worker in [*busy, *idle]:
            worker.stop()


class _Worker:
    """A spawned process that makes the games it is sent, one at a time."""

    def __init__(self, ctx):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child,), daemon=True)
        self.process.start()

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join()


def _serve(conn) -> None:
    while True:
        key, folder, planner = conn.recv()
        try:
            conn.send(("ok", generate_one(*key, folder, planner)))
        except BaseException as e:  # the parent reports it with the game's name
            conn.send(("error", f"{type(e).__name__}: {e}"))


def _timed_out(key: GameKey, folder: str, seconds: float, limit: float, planner: str = "expert") -> dict:
    """The dropped record of a game whose worker was stopped, written as generate_one would."""
    name, out = stem(*key), Path(folder)
    for leftover in out.glob(f".{name}.*.tw-pddl"):
        leftover.unlink(missing_ok=True)
    record = {"format": GEN_FORMAT, "key": name, "task_type": key[0], "floor_plan": key[1], "seed": key[2],
              "planner": planner, "status": FAILED, "reason": f"timed out: the game took more than {limit:g} s",
              "seconds": round(seconds, 3)}
    _write_json_atomic(out / f"{name}.dropped.json", record)
    return record
