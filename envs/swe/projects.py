"""The real projects bugs are synthesized in: pinned source distributions, fetched only by data
preparation (`launch.py gen-data`), or local folders.

Each pinned project is a small pure-Python library whose sdist ships its test suite, which runs
under pytest with nothing but the standard library (checked on Python 3.11). fetch_projects()
downloads the pinned sdists with pip (`pip download --no-deps --no-binary :all: --require-hashes`)
into <cache_dir>/sdists/ and checks each file's sha256 against the pin; resolve_projects() finds
them there for synthesis and never downloads: a missing file is an error that names
`launch.py gen-data`, a file whose hash differs is rejected.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path


class MissingDataError(FileNotFoundError):
    """Prepared data (sdists, synthesized instances) is not in the cache."""


class HashMismatchError(ValueError):
    """A cached or downloaded file is not the pinned one."""


GEN_DATA_HINT = "run `python launch.py gen-data <recipe>` first (data preparation is the only step that downloads)"


@dataclass(frozen=True)
class Project:
    """A project to synthesize bugs in.

    name/version/sha256/sdist: the pin (sha256 of the sdist file, its file name). path: where its
    source is on disk, an sdist (.tar.gz) or a folder; None until resolve_projects() fills it.
    source: folders or files whose functions are mutated; exclude: paths under them that are not
    (tests); tests: the pytest arguments that run the suite; pythonpath: folders put first on
    sys.path (a src layout).
    """

    name: str
    version: str
    source: tuple[str, ...]
    tests: tuple[str, ...]
    sha256: str | None = None
    sdist: str | None = None
    exclude: tuple[str, ...] = ()
    pythonpath: tuple[str, ...] = ()
    path: str | None = None
    notes: str = field(default="", compare=False)

    @property
    def repo(self) -> str:
        """The instance's `repo` field (owner/name)."""
        return f"pypi/{self.name}"

    def at(self, path: str | Path) -> Project:
        return replace(self, path=str(path))


def local_project(name: str, path: str | Path, source: tuple[str, ...], tests: tuple[str, ...],
                  version: str = "0", exclude: tuple[str, ...] = (), pythonpath: tuple[str, ...] = ()) -> Project:
    """A project read from a local folder (or sdist file) instead of the pinned downloads."""
    return Project(name, version, tuple(source), tuple(tests), exclude=tuple(exclude), pythonpath=tuple(pythonpath),
                   path=str(path))


# Pinned on Python 3.11 / pytest 9: every suite passes with only the standard library, in seconds.
PINNED: tuple[Project, ...] = (
    Project("toolz", "1.2.0", ("toolz",), ("toolz/tests", "toolz/sandbox/tests"),
            sha256="9667a038e9d6ecba37995e26cb2f59ec6420b6ad8dd9677de59db9b956b08490", sdist="toolz-1.2.0.tar.gz",
            exclude=("toolz/tests", "toolz/sandbox/tests"), notes="192 tests, ~2 s"),
    Project("cachetools", "8.0.2", ("src/cachetools",), ("tests",),
            sha256="30ac523adfc118b51d2b2e7bad8a0ddb31370dfe2700c7f10ca224f36ccf81e0",
            sdist="cachetools-8.0.2.tar.gz", pythonpath=("src",), notes="476 tests, ~1 s"),
    Project("boltons", "26.2.0", ("boltons",), ("tests",),
            sha256="d39cfd15c1a1c3bd4d705c82252fa9edb8e4f5e8cc039f8e39afac7b1b47e92c",
            sdist="boltons-26.2.0.tar.gz", notes="519 tests, ~4 s"),
    Project("tabulate", "0.10.0", ("tabulate",), ("test",),
            sha256="e2cfde8f79420f6deeffdeda9aaec3b6bc5abce947655d17ac662b126e48a60d",
            sdist="tabulate-0.10.0.tar.gz", notes="318 tests, ~4 s"),
    Project("more-itertools", "11.2.1", ("more_itertools",), ("tests",),
            sha256="cbf08fd0af284dc69718b9b76a8e6203df624d70209ea511e4219d350c856f63",
            sdist="more_itertools-11.2.1.tar.gz", notes="765 tests, ~25 s (one prime test takes 15 s)"),
    Project("inflection", "0.5.1", ("inflection",), ("test_inflection.py",),
            sha256="1a29730d366e996aaacffb2f1f1cb9593dc38e2ddd30c91250c6dde09ea9b417",
            sdist="inflection-0.5.1.tar.gz", notes="455 tests, ~1 s"),
)


def pinned(names: list[str] | tuple[str, ...] | None = None) -> list[Project]:
    """The pinned projects, all or by name (in the order given)."""
    by_name = {p.name: p for p in PINNED}
    if names is None:
        return list(PINNED)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise KeyError(f"unknown SWE projects {unknown}; pinned are {sorted(by_name)}")
    return [by_name[n] for n in names]


def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(project: Project, path: str | Path) -> Path:
    """path, if its sha256 is the project's pin; HashMismatchError otherwise."""
    path = Path(path)
    got = sha256_of(path)
    if project.sha256 is not None and got != project.sha256:
        raise HashMismatchError(f"{path}: sha256 {got} is not the pinned {project.sha256} of "
                                f"{project.name}=={project.version}; delete it and {GEN_DATA_HINT.split(' (')[0]}")
    return path


def sdist_path(project: Project, cache_dir: str | Path) -> Path:
    return Path(cache_dir) / "sdists" / (project.sdist or f"{project.name}-{project.version}.tar.gz")


def resolve_projects(cache_dir: str | Path, projects: list[Project] | None = None) -> list[Project]:
    """The projects with `path` set to their checked sdist in the cache (local projects as they
    are). Never downloads: a missing sdist is a MissingDataError naming `launch.py gen-data`."""
    out = []
    for p in pinned() if projects is None else projects:
        if p.path is not None:
            if not Path(p.path).exists():
                raise MissingDataError(f"project {p.name}: {p.path} does not exist")
            out.append(p if p.sha256 is None else p.at(verify(p, p.path)))
            continue
        path = sdist_path(p, cache_dir)
        if not path.exists():
            raise MissingDataError(f"project {p.name}=={p.version}: no {path}; {GEN_DATA_HINT}")
        out.append(p.at(verify(p, path)))
    return out


def fetch_projects(cache_dir: str | Path, projects: list[Project] | None = None, quiet: bool = True) -> list[Project]:
    """Download the pinned sdists into <cache_dir>/sdists/ (skipping those already there with the
    right hash) through pip with --require-hashes, and check each hash again. Data preparation
    only: synthesis and training read the cache through resolve_projects()."""
    folder = Path(cache_dir) / "sdists"
    folder.mkdir(parents=True, exist_ok=True)
    todo = []
    for p in pinned() if projects is None else projects:
        if p.path is not None:
            continue
        if p.sha256 is None or p.sdist is None:
            raise ValueError(f"project {p.name} has no pinned sha256 and sdist name to fetch")
        target = sdist_path(p, cache_dir)
        if target.exists():
            try:
                verify(p, target)
                continue
            except HashMismatchError:
                target.unlink()
        todo.append(p)
    for p in todo:
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            req = Path(tmp) / "requirements.txt"
            req.write_text(f"{p.name}=={p.version} --hash=sha256:{p.sha256}\n")
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--require-hashes",
                   "--disable-pip-version-check", "-r", str(req), "-d", str(Path(tmp) / "out")]
            res = subprocess.run(cmd + (["-q"] if quiet else []), capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"pip download of {p.name}=={p.version} failed:\n{res.stderr[-2000:]}")
            files = sorted((Path(tmp) / "out").iterdir())
            if len(files) != 1 or files[0].name != p.sdist:
                raise RuntimeError(f"pip download of {p.name}=={p.version} gave {[f.name for f in files]}, "
                                   f"expected {p.sdist}")
            verify(p, files[0])
            shutil.move(str(files[0]), sdist_path(p, cache_dir))
    return resolve_projects(cache_dir, projects)
