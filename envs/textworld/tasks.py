"""TextWorld task splits over generated (cached) games, and folders of games users bring.

Splits of a complexity, fixed so that results can be quoted and reproduced:
  train    the first train_size playable games from seeds 0, 1, 2, ...
  heldout  the first heldout_size playable games from seeds 1_000_000, 1_000_001, ... (test)
  valid    the first heldout_size playable games from seeds 2_000_000, 2_000_001, ... that are in
           neither train nor heldout: what periodic evals and tuning read
"Playable" means the walkthrough replays to a win (games that stall or fail are dropped and
counted). Each split holds distinct games; train skips any game whose content equals a heldout
game and valid any game in train or heldout (task_key is the game's content hash, not its
seed), so no two splits overlap. The heldout split depends on nothing else, train only on
heldout (both are what they were before valid existed), valid on both.

A task is {"id", "game": path of the .z8, "complexity", "seed", "walkthrough", "max_score",
"game_hash"}.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..base import TRAIN_SPLIT, VALID_SPLIT, TaskSource
from .config import TextWorldConfig
from .generate import KEPT, GameCache, GenerationReport, batch_size, game_hash, import_textworld

HELDOUT = "heldout"
SEED_START = {TRAIN_SPLIT: 0, HELDOUT: 1_000_000, VALID_SPLIT: 2_000_000}
# Give up with a clear error after this many seeds in a row that add no game to a split.
MAX_FRUITLESS_SEEDS = 200


class TextWorldTasks(TaskSource):
    """Generated TextWorld games of one complexity, split into train, valid and heldout."""

    def __init__(self, config: TextWorldConfig):
        self.config = config
        self.complexity = config.parsed
        self.cache = GameCache(self.complexity, config.cache_dir)
        self.reports: list[GenerationReport] = []  # one per generation round, in order
        self._tasks: dict[str, list[dict]] = {}

    @property
    def folder(self) -> Path:
        return self.cache.folder

    @property
    def generated(self) -> int:
        """Games this task source generated (0 when every game came from the cache)."""
        return sum(r.generated for r in self.reports)

    def splits(self) -> list[str]:
        return [TRAIN_SPLIT, VALID_SPLIT, HELDOUT]

    def size(self, split: str) -> int:
        self._check_split(split)
        return self.config.train_size if split == TRAIN_SPLIT else self.config.heldout_size

    def task_key(self, task: dict) -> Any:
        return task["game_hash"]

    def tasks(self, split: str) -> list[dict]:
        """The split's tasks, generating (and caching) the games still missing."""
        self._check_split(split)
        if split not in self._tasks:
            others = {TRAIN_SPLIT: [HELDOUT], HELDOUT: [], VALID_SPLIT: [TRAIN_SPLIT, HELDOUT]}[split]
            excluded = {t["game_hash"] for other in others for t in self.tasks(other)}
            self._tasks[split] = self._assemble(split, excluded)
        return [dict(t) for t in self._tasks[split]]

    def _assemble(self, split: str, excluded: set[str]) -> list[dict]:
        n, start = self.size(split), SEED_START[split]
        end = min((s for s in SEED_START.values() if s > start), default=None)  # the next split's seeds
        records = self.cache.records()
        chosen: list[dict] = []
        seen = set(excluded)
        seed, fruitless, last_reason = start, 0, ""
        while len(chosen) < n:
            if end is not None and seed >= end:
                raise ValueError(f"textworld {self.complexity.name}: {split} split of {n} games would need "
                                 f"seeds from the next split's range (>= {end})")
            if seed not in records:
                count = batch_size(n - len(chosen), self.cache.keep_rate(), self.config.workers)
                report = self.cache.generate(
                    range(seed, seed + count), self.config.workers, self.config.progress, split
                )
                self.reports.append(report)
                continue
            record = records[seed]
            if record["status"] == KEPT and record["game_hash"] not in seen:
                seen.add(record["game_hash"])
                chosen.append(self._task(split, len(chosen), record))
                fruitless = 0
            else:
                fruitless += 1
                last_reason = record.get("reason") or "the same game as an earlier seed"
                if fruitless >= MAX_FRUITLESS_SEEDS:
                    raise ValueError(
                        f"textworld {self.complexity.name} {split}: {fruitless} seeds in a row gave "
                        f"no new playable game (last: {last_reason}); found {len(chosen)} of {n}. "
                        "Lower quest length / the split size or raise world size / objects"
                    )
            seed += 1
        return chosen

    def _task(self, split: str, index: int, record: dict) -> dict:
        return {
            "id": f"textworld/{self.complexity.name}/{split}/{index}",
            "game": str(self.cache.game_path(record["seed"])),
            "complexity": self.complexity.name,
            "seed": record["seed"],
            "walkthrough": list(record["walkthrough"]),
            "max_score": record["max_score"],
            "game_hash": record["game_hash"],
        }

    def tasks_from_file(self, path: str) -> list[dict]:
        """Tasks from a folder of .z8 games (e.g. made elsewhere with `tw-make`; searched
        recursively) or from one .z8 file. Each game needs the .json textworld writes next to
        it; its walkthrough and max score are read from there (or from our .meta.json)."""
        return load_games(path)


def load_games(path: str | Path) -> list[dict]:
    """Task dicts for the .z8 games under a folder (sorted by path) or for one .z8 file."""
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"games folder {str(path)!r} does not exist")
    if root.is_dir():
        games = sorted(root.rglob("*.z8"))
        if not games:
            raise ValueError(f"games folder {str(path)!r} holds no .z8 games")
    elif root.suffix == ".z8":
        games = [root]
    else:
        raise ValueError(f"{str(path)!r} is neither a folder of .z8 games nor a .z8 game")
    label = root.name if root.is_dir() else root.parent.name
    return [_task_from_game(game, f"{label}/{i}") for i, game in enumerate(games)]


def _task_from_game(z8: Path, task_id: str) -> dict:
    game_file = z8.with_suffix(".json")
    if not game_file.exists():
        raise ValueError(f"{z8}: no {game_file.name} next to it; textworld writes it with the "
                         "game and needs it to report score, wins and admissible commands")
    meta_file = z8.with_name(f"{z8.stem}.meta.json")
    try:
        data = json.loads(game_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{game_file}: bad JSON ({e.msg})") from None
    task = {"id": task_id, "game": str(z8.resolve()), "game_hash": game_hash(data)}
    if meta_file.exists():
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        task.update(complexity=meta.get("complexity"), seed=meta.get("seed"),
                    walkthrough=meta.get("walkthrough"), max_score=meta.get("max_score"))
        return task
    tw = import_textworld()
    game = tw.Game.load(str(game_file))
    walkthrough = (data.get("metadata") or {}).get("walkthrough")
    task.update(walkthrough=list(walkthrough) if walkthrough else None,
                max_score=int(game.max_score))
    return task
