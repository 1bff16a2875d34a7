"""Offline TextWorld game generation with a per-seed cache.

One game per (complexity, seed), made with textworld's Python API (custom games through
`textworld.generator.make_game`, the simple / cooking challenges through their `make`), compiled
to `.z8`, then checked by replaying its walkthrough to a win. The cache folder of a complexity
holds, per seed (file stem `seed0000042`):

  seed0000042.z8            the game
  seed0000042.json          textworld's game file (needed to play: score, won, admissible cmds)
  seed0000042.meta.json     ours: settings, seed, walkthrough, max_score, game_hash, ...
  seed0000042.dropped.json  instead of the three above when the game was dropped: why

plus `settings.json` (the complexity's settings and the textworld version). A seed counts as
done once its .meta.json or .dropped.json exists (both are written last, by atomic rename), so
a killed run leaves no half game behind and a second run generates only missing seeds.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Iterable

from .config import Complexity, parse_complexity

META_FORMAT = 1
SETTINGS_FILE = "settings.json"
# A walkthrough command answered by one of these is a parser question: the walkthrough stalls.
PARSER_QUESTION_RE = re.compile(
    r"Which do you mean|What do you want to|Who do you want to|Whom do you want to|"
    r"Please answer yes or no|Are you sure you want to",
    re.IGNORECASE,
)
KEPT, STALLED, FAILED = "kept", "stalled", "failed"


@contextmanager
def quiet_jericho():
    """Hide jericho's "not fully supported ... score detection disabled" warning: textworld
    tracks the score itself, from the game's .json."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is not fully supported")
        yield


def import_textworld():
    """The textworld package, or an ImportError that says how to install it."""
    try:
        import textworld  # noqa: F401
        import textworld.challenges  # noqa: F401  (registers tw-simple, tw-cooking, ...)
        import textworld.generator  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"the textworld env needs the textworld package ({e}): "
            "pip install 'textworld>=1.6' (or the project's [textworld] extra)"
        ) from None
    return sys.modules["textworld"]


def textworld_version() -> str:
    return getattr(import_textworld(), "__version__", "unknown")


def stem(seed: int) -> str:
    return f"seed{seed:07d}"


def game_hash(game_json: dict) -> str:
    """Identity of a game's content (world, quests, entity texts, objective), not of its seed,
    so two seeds that happen to give the same game share a hash."""
    content = {k: game_json.get(k) for k in ("world", "quests", "infos", "objective")}
    blob = json.dumps(content, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# One game (runs in a worker process, or in-process with workers=1)


def make_game(complexity: Complexity, seed: int, path: str):
    """A textworld Game object (not yet compiled) for one seed; options.path is set to `path`."""
    tw = import_textworld()
    tw.g_rng.set_seed(seed)  # textworld falls back on this global RNG in places
    options = tw.GameOptions()
    options.seeds = seed
    options.path = path
    options.file_ext = ".z8"
    options.force_recompile = True
    if complexity.kind == "custom":
        q = complexity.quest_length
        options.nb_rooms = complexity.world_size
        options.nb_objects = complexity.nb_objects
        options.chaining.min_length = options.chaining.max_length = q
        options.chaining.max_depth = q
        return tw.generator.make_game(options), options
    challenge = "tw-simple" if complexity.kind == "simple" else "tw-cooking"
    make = tw.challenges.CHALLENGES[challenge][1]
    return make(settings=dict(complexity.challenge_settings), options=options), options


def replay_walkthrough(z8_path: str, walkthrough: list[str]) -> dict[str, Any]:
    """Play the walkthrough; {status, reason, steps, score, max_score}. `steps` is how many
    commands it took to win (the walkthrough may win before its end)."""
    tw = import_textworld()
    infos = tw.EnvInfos(feedback=True, won=True, lost=True, score=True, max_score=True)
    with quiet_jericho():
        env = tw.start(z8_path, infos)
    try:
        state = env.reset()
        for i, command in enumerate(walkthrough):
            state, _, done = env.step(command)
            feedback = state.feedback or ""
            if PARSER_QUESTION_RE.search(feedback):
                reply = " ".join(feedback.split())[:120]
                return {"status": STALLED, "reason": f"command {i + 1} {command!r} got a parser "
                        f"question: {reply!r}", "steps": i + 1}
            if state.won:
                return {"status": KEPT, "reason": "", "steps": i + 1, "score": state.score,
                        "max_score": state.max_score}
            if state.lost or done:
                return {"status": FAILED, "reason": f"command {i + 1} {command!r} lost the game",
                        "steps": i + 1}
        return {"status": FAILED, "reason": f"the walkthrough ({len(walkthrough)} commands) "
                f"does not win (score {state.score}/{state.max_score})", "steps": len(walkthrough)}
    finally:
        env.close()


def generate_one(complexity_name: str, seed: int, folder: str) -> dict[str, Any]:
    """Make, compile and check one game; write it (or a dropped record) to `folder`.
    Returns the record written (a .meta.json or .dropped.json payload) plus `seconds`."""
    complexity = parse_complexity(complexity_name)
    out = Path(folder)
    name = stem(seed)
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out))
    base = {"format": META_FORMAT, "complexity": complexity.name, "seed": seed,
            "settings": complexity.to_dict()}
    try:
        try:
            with quiet_jericho():  # tw-simple plays its game while making it
                game, options = make_game(complexity, seed, str(work / f"{name}.z8"))
            walkthrough = list(game.metadata.get("walkthrough") or [])
            if not walkthrough:
                raise RuntimeError("the generator gave no walkthrough")
            tw = import_textworld()
            with quiet_jericho():
                z8 = tw.generator.compile_game(game, options)
            check = replay_walkthrough(z8, walkthrough)
        except (OSError, ImportError):
            raise  # the machine's problem (no compiler, disk full): not this seed's, record nothing
        except Exception as e:  # the generator or compiler failed on this seed: drop it, say why
            check = {"status": FAILED, "reason": f"{type(e).__name__}: {e}"[:500]}
        seconds = time.perf_counter() - start
        if check["status"] != KEPT:
            record = {**base, "status": check["status"], "reason": check["reason"],
                      "seconds": round(seconds, 3)}
            _write_json_atomic(out / f"{name}.dropped.json", record)
            return {**record, "seconds": seconds}
        game_json = json.loads((work / f"{name}.json").read_text(encoding="utf-8"))
        record = {
            **base,
            "status": KEPT,
            "walkthrough": walkthrough[: check["steps"]],
            "max_score": int(check["max_score"]),
            "objective": game_json.get("objective", ""),
            "game_hash": game_hash(game_json),
            "textworld_version": getattr(tw, "__version__", "unknown"),
            "seconds": round(seconds, 3),
        }
        for ext in (".z8", ".json"):
            os.replace(work / f"{name}{ext}", out / f"{name}{ext}")
        _write_json_atomic(out / f"{name}.meta.json", record)  # last: marks the seed as done
        return {**record, "seconds": seconds}
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The cache of one complexity


@dataclass
class GenerationReport:
    """What one generate_games() call did."""

    complexity: str
    label: str
    generated: int = 0
    kept: int = 0
    stalled: int = 0
    failed: int = 0
    seconds: float = 0.0
    workers: int = 1

    @property
    def dropped(self) -> int:
        return self.stalled + self.failed

    @property
    def games_per_s(self) -> float:
        return self.generated / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        return (f"textworld {self.complexity} {self.label}: generated {self.generated} games in "
                f"{self.seconds:.1f} s = {self.games_per_s:.2f} games/s ({self.workers} "
                f"worker{'s' if self.workers != 1 else ''}); kept {self.kept}, dropped "
                f"{self.dropped} ({self.stalled} stalled on a parser question, {self.failed} "
                "failed)")


class GameCache:
    """The cache folder of one complexity: which seeds are done, and generating missing ones."""

    def __init__(self, complexity: Complexity, cache_dir: str | Path):
        self.complexity = complexity
        self.folder = Path(cache_dir).expanduser().resolve() / complexity.name
        self._records: dict[int, dict] | None = None

    def ensure_folder(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / SETTINGS_FILE
        settings = self.complexity.to_dict()
        if path.exists():
            old = json.loads(path.read_text(encoding="utf-8"))
            if old.get("settings") != settings:
                raise ValueError(f"cache folder {self.folder} holds games of other settings "
                                 f"({old.get('settings')}); point cache_dir elsewhere or remove it")
        else:
            _write_json_atomic(path, {"settings": settings, "textworld_version": textworld_version()})

    def records(self) -> dict[int, dict]:
        """{seed: record} of every seed done (kept or dropped), read once then kept updated."""
        if self._records is None:
            self._records = {}
            if self.folder.is_dir():
                for path in self.folder.glob("seed*.json"):
                    if path.name.endswith(".meta.json") or path.name.endswith(".dropped.json"):
                        record = json.loads(path.read_text(encoding="utf-8"))
                        if record.get("status") == KEPT and not (
                            path.with_name(f"{stem(record['seed'])}.z8").exists()
                        ):
                            continue  # a game file went missing: regenerate that seed
                        self._records[int(record["seed"])] = record
        return self._records

    def game_path(self, seed: int) -> Path:
        return self.folder / f"{stem(seed)}.z8"

    def keep_rate(self) -> float:
        """Fraction of generated seeds kept so far (0.8 until there are 10 to judge by)."""
        records = self.records()
        if len(records) < 10:
            return 0.8
        kept = sum(r["status"] == KEPT for r in records.values())
        return min(max(kept / len(records), 0.05), 1.0)

    def generate(self, seeds: Iterable[int], workers: int = 1, progress: bool = True,
                 label: str = "") -> GenerationReport:
        """Generate the given seeds that are not done yet; prints the summary line."""
        self.ensure_folder()
        records = self.records()
        todo = [s for s in dict.fromkeys(seeds) if s not in records]
        report = GenerationReport(self.complexity.name, label, workers=workers)
        if not todo:
            return report
        from tqdm.auto import tqdm

        start = time.perf_counter()
        bar = tqdm(total=len(todo), desc=f"textworld {self.complexity.name} {label}".strip(),
                   unit="game", disable=not progress, file=sys.stderr)
        try:
            for record in _run(self.complexity.name, todo, str(self.folder), workers):
                record.pop("seconds", None)
                records[int(record["seed"])] = record
                report.generated += 1
                status = record["status"]
                report.kept += status == KEPT
                report.stalled += status == STALLED
                report.failed += status == FAILED
                bar.update(1)
                bar.set_postfix(kept=report.kept, dropped=report.dropped, refresh=False)
        finally:
            bar.close()
        report.seconds = time.perf_counter() - start
        if progress:
            print(str(report), file=sys.stderr, flush=True)
        return report


def _run(complexity_name: str, seeds: list[int], folder: str, workers: int):
    """Records of generate_one over seeds, in-process for one worker, else a process pool
    (spawned, so that no thread state of the caller is forked)."""
    if workers <= 1 or len(seeds) == 1:
        for seed in seeds:
            yield generate_one(complexity_name, seed, folder)
        return
    ctx = get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(seeds)), mp_context=ctx) as pool:
        futures = [pool.submit(generate_one, complexity_name, s, folder) for s in seeds]
        for future in as_completed(futures):
            yield future.result()


def batch_size(need: int, keep_rate: float, workers: int) -> int:
    """How many new seeds to try for `need` more games: enough for the expected drop rate,
    rounded up to use every worker."""
    n = max(round(need / keep_rate), need, 1)
    return math.ceil(n / workers) * workers if n > 1 else n
