"""Offline ALFWorld game generation, checked by the planner, with a per-game cache.

A game is made per (task type, floor plan, seed) by problems.build_game, written as `.tw-pddl`,
then played through textworld's PDDL backend with ALFWorld's wrappers: it is kept only if the
planner (fast-downward, textworld's `policy_commands`) finds a plan from the start and replaying
that plan command by command wins. The cache folder (one per generator version) holds per game
(file stem `<task type>-FloorPlan<N>-seed<seed>`):

  <stem>.tw-pddl        the game (ALFWorld's format, plus the expert plan as "walkthrough")
  <stem>.meta.json      ours: task type, floor plan, seed, targets, goal text, plan, game_hash
  <stem>.dropped.json   instead of the two above when the game was dropped: why

plus `settings.json`. As in envs/textworld, the .meta.json / .dropped.json is written last by
atomic rename, so a killed run leaves no half game and a second run makes only missing games.
"""

from __future__ import annotations

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
from .layouts import alfworld_version, import_alfworld
from .problems import build_game, constants, game_hash

# Bump when a change to problems.py changes the games a (task type, floor plan, seed) gives.
GEN_FORMAT = 1
SETTINGS_FILE = "settings.json"
GameKey = tuple[str, int, int]  # (task type, floor plan, seed)


def stem(task_type: str, floor_plan: int, seed: int) -> str:
    return f"{task_type}-FloorPlan{floor_plan}-seed{seed:07d}"


# Problems whose PDDL -> SAS translation a process keeps (a kitchen's is a few MB).
TRANSLATIONS_KEPT = 256


@functools.cache
def _translate_once_per_problem() -> None:
    """Make textworld's PDDL backend translate each problem once per process. PddlEnv translates
    the problem (PDDL -> SAS, in Python: about a second for a kitchen) on load and again on every
    reset; the result depends only on the texts, and the backend reads it without changing it."""
    import fast_downward

    translate = fast_downward.pddl2sas

    @functools.lru_cache(maxsize=TRANSLATIONS_KEPT)
    def pddl2sas(domain: str, problem: str, verbose: bool = False, optimize: bool = False):
        argv = list(sys.argv)  # the translator overwrites sys.argv for its option parser
        try:
            return translate(domain, problem, verbose=verbose, optimize=optimize)
        finally:
            sys.argv[:] = argv

    fast_downward.pddl2sas = pddl2sas


def start_game(path: str):
    """A textworld env playing one .tw-pddl game the way ALFWorld does: the PDDL backend under
    AlfredDemangler (entity names read "apple 1") and AlfredInfos, admissible commands listed."""
    import_alfworld()
    import textworld
    from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredInfos

    _translate_once_per_problem()
    infos = textworld.EnvInfos(feedback=True, won=True, admissible_commands=True, extras=["gamefile"])
    return textworld.start(path, infos, wrappers=[AlfredDemangler(shuffle=False), AlfredInfos])


def plan_from_here(game) -> list[str]:
    """The planner's plan (fast-downward) from the game's current state, as commands; [] if it
    finds none. What textworld computes as `policy_commands` after every step when asked; asked
    here only when needed, since it is the slow part of a step (about 0.3-1 s in a kitchen)."""
    backend = game.unwrapped
    return list(backend._pddl_state.replan(backend._entity_infos))


def check_game(path: str) -> dict:
    """Replay the planner's plan from the start; {status, reason, walkthrough}."""
    env = start_game(path)
    try:
        state = env.reset()
        if state.won:
            return {"status": FAILED, "reason": "won before any move"}
        plan = plan_from_here(env)
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


def generate_one(task_type: str, floor_plan: int, seed: int, folder: str) -> dict:
    """Make and check one game; write it (or a dropped record) to `folder`. Returns the record
    written plus `seconds`."""
    start = time.perf_counter()
    out, name = Path(folder), stem(task_type, floor_plan, seed)
    base = {"format": GEN_FORMAT, "key": name, "task_type": task_type, "floor_plan": floor_plan, "seed": seed}
    game = build_game(task_type, floor_plan, seed)
    if game is None:
        check = {"status": FAILED, "reason": f"FloorPlan{floor_plan} cannot host {task_type}"}
    else:
        params, goal = game.pop("params"), game.pop("goal")
        tmp = out / f".{name}.{os.getpid()}.tw-pddl"
        tmp.write_text(json.dumps({**game, "solvable": True}), encoding="utf-8")
        try:
            check = check_game(str(tmp))
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

    def __init__(self, cache_dir: str | Path):  # no complexity: one folder per generator version
        self.folder = Path(cache_dir).expanduser().resolve() / f"generated-v{GEN_FORMAT}"
        self._records: dict[str, dict] | None = None

    def ensure_folder(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / SETTINGS_FILE
        if not path.exists():
            _write_json_atomic(path, {"format": GEN_FORMAT, "alfworld_version": alfworld_version()})

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
            for record in _run(todo, str(self.folder), workers, time_limit):
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


def _run(keys: list[GameKey], folder: str, workers: int, time_limit: float | None):
    """Records of generate_one over keys: in-process for one worker without a time limit, else in
    spawned worker processes, one game at a time each. A game that takes longer than `time_limit`
    seconds (the planner is a blind search: a nine-step plan in a big room can take minutes) is
    dropped: its worker is stopped and replaced."""
    if time_limit is None and (workers <= 1 or len(keys) == 1):
        for key in keys:
            yield generate_one(*key, folder)
        return
    ctx = get_context("spawn")
    todo, busy, idle = list(reversed(keys)), {}, []  # busy: worker -> (key, started)
    try:
        while todo or busy:
            while todo and len(busy) < workers:
                worker = idle.pop() if idle else _Worker(ctx)
                key = todo.pop()
                worker.conn.send((key, folder))
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
                    yield _timed_out(key, folder, time.monotonic() - started, time_limit)
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
        key, folder = conn.recv()
        try:
            conn.send(("ok", generate_one(*key, folder)))
        except BaseException as e:  # the parent reports it with the game's name
            conn.send(("error", f"{type(e).__name__}: {e}"))


def _timed_out(key: GameKey, folder: str, seconds: float, limit: float) -> dict:
    """The dropped record of a game whose worker was stopped, written as generate_one would."""
    name, out = stem(*key), Path(folder)
    for leftover in out.glob(f".{name}.*.tw-pddl"):
        leftover.unlink(missing_ok=True)
    record = {"format": GEN_FORMAT, "key": name, "task_type": key[0], "floor_plan": key[1], "seed": key[2],
              "status": FAILED, "reason": f"timed out: the planner took more than {limit:g} s",
              "seconds": round(seconds, 3)}
    _write_json_atomic(out / f"{name}.dropped.json", record)
    return record
