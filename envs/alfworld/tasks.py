"""ALFWorld task splits: generated games split by room, or the official games on disk.

Generated (source: generated), fixed by the config so that results can be quoted and reproduced:
  train         games in train_floor_plans, seeds 0, 1, 2, ...
  heldout       games in heldout_floor_plans (rooms never seen in training), seeds 1_000_000, ...
  valid         games in valid_floor_plans (tuning), seeds 2_000_000, ...
  heldout_seen  new games in train_floor_plans, seeds 3_000_000, ..., none equal to a train game
Each split holds its size divided evenly over the config's task types (in order, the first types
take the remainder), and a task type's games go round the split's rooms that can host it: its
j-th candidate is seed start + j in room j mod (those rooms). Dropped games are skipped and
counted. Tasks alternate between task types, so the first n of a split cover every type.

Official (source: official), read from <official_dir>/json_2.1.1/ as ALFWorld reads it:
  train = train/ (less the games valid takes), valid = the last heldout_size games of train/,
  heldout = valid_unseen/ (unseen rooms), heldout_seen = valid_seen/. Like ALFWorld, trials of
  movable-receptacle and sliced tasks are skipped, and games marked unsolvable.

A task is {"id", "game": path of the .tw-pddl, "task_type", "floor_plan", "seed", "walkthrough"
(the planner's plan; None for official games until a demonstration asks the planner), "goal",
"game_hash"}.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..base import TRAIN_SPLIT, VALID_SPLIT, TaskSource
from ..textworld.generate import KEPT
from ..textworld.generate import batch_size as textworld_batch_size
from .config import AlfWorldConfig
from .generate import AlfWorldGames, AlfWorldReport, stem
from .problems import game_hash, playable_task_types

HELDOUT, HELDOUT_SEEN = "heldout", "heldout_seen"
SPLITS = [TRAIN_SPLIT, VALID_SPLIT, HELDOUT, HELDOUT_SEEN]
SEED_START = {TRAIN_SPLIT: 0, HELDOUT: 1_000_000, VALID_SPLIT: 2_000_000, HELDOUT_SEEN: 3_000_000}
SEED_STRIDE = 10_000_000  # config.seed shifts every split's seeds by this much
ROOMS = {TRAIN_SPLIT: "train_floor_plans", HELDOUT_SEEN: "train_floor_plans",
         VALID_SPLIT: "valid_floor_plans", HELDOUT: "heldout_floor_plans"}
OFFICIAL_FOLDER = {TRAIN_SPLIT: "train", VALID_SPLIT: "train", HELDOUT: "valid_unseen",
                   HELDOUT_SEEN: "valid_seen"}
# Give up with a clear error after this many candidates in a row that add no game to a split.
MAX_FRUITLESS = 200


def interleave(by_type: list[list[dict]]) -> list[dict]:
    """Round-robin over the task types' lists: type 1, type 2, ..., type 1, ..."""
    out = []
    for i in range(max((len(x) for x in by_type), default=0)):
        out += [x[i] for x in by_type if i < len(x)]
    return out


class AlfWorldTasks(TaskSource):
    """ALFWorld games split into train, valid, heldout (unseen rooms) and heldout_seen."""

    def __init__(self, config: AlfWorldConfig):
        self.config = config
        self.games = AlfWorldGames(config.cache_dir, config.planner)
        self.reports: list[AlfWorldReport] = []  # one per generation round, in order
        self._tasks: dict[str, list[dict]] = {}

    @property
    def folder(self) -> Path:
        return self.config.official_root if self.config.source == "official" else self.games.folder

    @property
    def generated(self) -> int:
        return sum(r.generated for r in self.reports)

    def splits(self) -> list[str]:
        return list(SPLITS)

    def size(self, split: str) -> int:
        self._check_split(split)
        return self.config.train_size if split == TRAIN_SPLIT else self.config.heldout_size

    def task_key(self, task: dict) -> Any:
        return task["game_hash"]

    def tasks(self, split: str) -> list[dict]:
        """The split's tasks (generating and caching the games still missing)."""
        self._check_split(split)
        if split not in self._tasks:
            if self.config.source == "official":
                self._tasks[split] = self._official(split)
            else:
                excluded = {t["game_hash"] for t in self.tasks(TRAIN_SPLIT)} if split == HELDOUT_SEEN else set()
                self._tasks[split] = self._assemble(split, excluded)
        return [dict(t) for t in self._tasks[split]]

    # -- generated games ------------------------------------------------------------------------

    def _quotas(self, n: int) -> list[int]:
        k = len(self.config.task_types)
        return [n // k + (i < n % k) for i in range(k)]

    def _assemble(self, split: str, excluded: set[str]) -> list[dict]:
        start = SEED_START[split] + self.config.seed * SEED_STRIDE
        rooms = getattr(self.config, ROOMS[split])
        by_type = []
        for task_type, quota in zip(self.config.task_types, self._quotas(self.size(split))):
            hosts = [n for n in rooms if playable_task_types(n, [task_type])]
            by_type.append(self._fill(split, task_type, hosts, start, quota, excluded) if quota else [])
        return [{**t, "id": f"alfworld/{split}/{i}"} for i, t in enumerate(interleave(by_type))]

    def _fill(self, split: str, task_type: str, hosts: list[int], start: int, quota: int,
              excluded: set[str]) -> list[dict]:
        """The first `quota` kept, new games of one task type (its j-th candidate: seed start + j
        in room hosts[j % len(hosts)])."""
        if not hosts:
            raise ValueError(f"alfworld {split}: none of its rooms ({ROOMS[split]}) can host {task_type}; "
                             "drop it from task_types or add rooms that can")

        def key(j: int) -> tuple[str, int, int]:
            return task_type, hosts[j % len(hosts)], start + j

        records, chosen, seen = self.games.records(), [], set(excluded)
        j = fruitless = 0
        last_reason = ""
        while len(chosen) < quota:
            if j >= SEED_STRIDE // 10:
                raise ValueError(f"alfworld {split} {task_type}: ran out of seeds")
            if stem(*key(j)) not in records:
                count = textworld_batch_size(quota - len(chosen), self.games.keep_rate(), self.config.workers)
                self.reports.append(self.games.generate([key(j + i) for i in range(count)], self.config.workers,
                                                        self.config.progress, f"{split} {task_type}",
                                                        self.config.game_time_limit))
                continue
            record = records[stem(*key(j))]
            if record["status"] == KEPT and record["game_hash"] not in seen:
                seen.add(record["game_hash"])
                chosen.append(self._task(record))
                fruitless = 0
            else:
                fruitless += 1
                last_reason = record.get("reason") or "the same game as an earlier one"
                if fruitless >= MAX_FRUITLESS:
                    raise ValueError(f"alfworld {split} {task_type}: {fruitless} candidates in a row gave no "
                                     f"new playable game (last: {last_reason}); found {len(chosen)} of {quota}")
            j += 1
        return chosen

    def _task(self, record: dict) -> dict:
        return {"id": record["key"], "game": str(self.games.game_path(record["key"])),
                "task_type": record["task_type"], "floor_plan": record["floor_plan"], "seed": record["seed"],
                "walkthrough": list(record["walkthrough"]), "goal": record["goal"],
                "game_hash": record["game_hash"]}

    # -- official games ---------------------------------------------------------------------------

    def _official(self, split: str) -> list[dict]:
        folder = self.config.official_root / OFFICIAL_FOLDER[split]
        tasks = load_games(folder, self.config.task_types, official=True)
        if split in (TRAIN_SPLIT, VALID_SPLIT):  # valid: the last heldout_size games of train/
            cut = max(len(tasks) - self.config.heldout_size, 0)
            tasks = tasks[:cut] if split == TRAIN_SPLIT else tasks[cut:]
        by_type = [[t for t in tasks if t["task_type"] == tt] for tt in self.config.task_types]
        chosen = interleave(by_type)[: self.size(split)]
        return [{**t, "id": f"alfworld-official/{split}/{i}"} for i, t in enumerate(chosen)]

    def tasks_from_file(self, path: str) -> list[dict]:
        """Tasks from a folder of .tw-pddl games (searched recursively: the official layout, this
        env's cache, or games made elsewhere) or from one .tw-pddl file."""
        return load_games(path, self.config.task_types)


def load_games(path: str | Path, task_types=None, official: bool = False) -> list[dict]:
    """Task dicts for the .tw-pddl games under a folder (sorted by path) or for one file. The task
    type and room come from the traj_data.json beside a game (ALFWorld's layout) or our .meta.json;
    with `official`, the folder must be ALFWorld's layout and games are filtered as ALFWorld does."""
    root = Path(path).expanduser()
    layout = "<task>/<trial>/game.tw-pddl with traj_data.json beside it"
    if not root.exists():
        raise FileNotFoundError(f"alfworld games folder {str(root)!r} does not exist"
                                + (f"; expected {layout}" if official else ""))
    games = sorted(root.rglob("*.tw-pddl")) if root.is_dir() else [root]
    if official:
        games = [g for g in games if "movable" not in str(g) and "Sliced" not in str(g)]
    tasks = []
    for i, game in enumerate(games):
        task = _task_from_game(game, f"{root.name}/{i}", require_traj=official)
        if task is not None and (task_types is None or task["task_type"] in (None, *task_types)):
            tasks.append(task)
    if not tasks:
        raise ValueError(f"alfworld games folder {str(root)!r} holds no playable .tw-pddl game of task types "
                         f"{list(task_types or [])}" + (f"; expected {layout}" if official else ""))
    return tasks


def _task_from_game(game: Path, task_id: str, require_traj: bool) -> dict | None:
    try:
        data = json.loads(game.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{game}: not a .tw-pddl game (bad JSON: {e})") from None
    missing = [k for k in ("pddl_domain", "grammar", "pddl_problem") if not isinstance(data.get(k), str)]
    if missing:
        raise ValueError(f"{game}: not a .tw-pddl game (no {', '.join(missing)}); a game is ALFWorld's JSON "
                         "with pddl_domain, grammar and pddl_problem")
    if data.get("solvable") is False:
        return None
    traj_file, meta_file = game.with_name("traj_data.json"), game.with_name(game.name.replace(".tw-pddl", ".meta.json"))
    if traj_file.exists():
        try:
            traj = json.loads(traj_file.read_text(encoding="utf-8"))
            task_type, floor_plan = traj["task_type"], int(traj["scene"]["scene_num"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{traj_file}: not ALFRED's traj_data.json (needs task_type and scene.scene_num; "
                             f"{type(e).__name__}: {e})") from None
        seed = None
    elif meta_file.exists():
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        task_type, floor_plan, seed = meta["task_type"], meta["floor_plan"], meta["seed"]
    elif require_traj:
        raise ValueError(f"{game}: no traj_data.json beside it (ALFWorld's layout keeps one per trial)")
    else:
        task_type, floor_plan, seed = None, None, None
    task_text = data["grammar"].partition("Your task is to: ")[2]
    goal = task_text.split('."', 1)[0]
    return {"id": task_id, "game": str(game.resolve()), "task_type": task_type, "floor_plan": floor_plan,
            "seed": seed, "walkthrough": list(data["walkthrough"]) if data.get("walkthrough") else None,
            "goal": goal, "game_hash": game_hash(data)}
