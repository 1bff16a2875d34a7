"""The alfworld package: importing it safely, and the AI2-THOR floor plans it ships.

alfworld 0.4.2 ships, per floor plan N, `gen/layouts/FloorPlanN-objects.json` (the object and
receptacle types in the room) and `FloorPlanN-openable.json` (receptacle instances with the point
the agent stands at to reach them), plus the PDDL domain `data/alfred.pddl` and the grammar
`data/alfred.twl2`. It ships no games.

`import alfworld` creates the folder `$ALFWORLD_DATA` (by default under the home folder), so
import_alfworld() sets it first when the user has not. The floor-plan files are read without
importing the package (config validation works, and `import envs` works, without alfworld).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

# ALFRED's 120 rooms: 30 of each scene type.
SCENE_TYPES = {"Kitchen": range(1, 31), "LivingRoom": range(201, 231), "Bedroom": range(301, 331),
               "Bathroom": range(401, 431)}
ALL_FLOOR_PLANS = tuple(n for rooms in SCENE_TYPES.values() for n in rooms)


def scene_type(floor_plan: int) -> str:
    for name, rooms in SCENE_TYPES.items():
        if floor_plan in rooms:
            return name
    raise ValueError(f"floor plan {floor_plan} is none of ALFRED's rooms (1-30, 201-230, 301-330, 401-430)")


def default_data_dir() -> str:
    """Where $ALFWORLD_DATA points when the user set nothing: a temporary folder (the generated
    games do not read it; official games are found through it)."""
    return str(Path(tempfile.gettempdir()) / "alfworld_data")


@functools.cache
def package_dir() -> Path | None:
    """The installed alfworld package's folder, found without importing it; None if absent."""
    try:
        spec = importlib.util.find_spec("alfworld")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def import_alfworld():
    """The alfworld package (with the modules this env uses loaded), or an ImportError that says
    how to install it. Sets $ALFWORLD_DATA first if unset, since importing alfworld creates it."""
    os.environ.setdefault("ALFWORLD_DATA", default_data_dir())
    try:
        import alfworld  # noqa: F401
        import alfworld.agents.environment.alfred_tw_env  # noqa: F401  (AlfredDemangler, AlfredInfos)
        import alfworld.gen.constants  # noqa: F401
        import alfworld.gen.goal_library  # noqa: F401
        import textworld.envs.pddl  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"the alfworld env needs the alfworld package ({e}): "
            "pip install 'alfworld>=0.4.2' (or the project's [alfworld] extra)"
        ) from None
    return sys.modules["alfworld"]


def alfworld_version() -> str:
    return getattr(import_alfworld(), "__version__", "unknown")


def layout_file(floor_plan: int, kind: str) -> Path | None:
    """gen/layouts/FloorPlan<N>-<kind>.json of the installed package (None without the package)."""
    root = package_dir()
    return None if root is None else root / "gen" / "layouts" / f"FloorPlan{floor_plan}-{kind}.json"


def missing_floor_plans(floor_plans) -> list[int]:
    """The floor plans the installed package has no files for (against ALFRED's list of rooms
    when alfworld is not installed)."""
    if package_dir() is None:
        return [n for n in floor_plans if n not in ALL_FLOOR_PLANS]
    return [n for n in floor_plans
            if not (layout_file(n, "objects").is_file() and layout_file(n, "openable").is_file())]


@functools.cache
def room(floor_plan: int) -> tuple[frozenset[str], dict[str, tuple]]:
    """(the types in the room, {receptacle id: (x, z, rotation, horizon)}) from the package."""
    types = json.loads(layout_file(floor_plan, "objects").read_text(encoding="utf-8"))
    points = json.loads(layout_file(floor_plan, "openable").read_text(encoding="utf-8"))
    return frozenset(types), {rid: tuple(point) for rid, point in sorted(points.items())}
