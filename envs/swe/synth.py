"""Offline synthesis of SWE instances from real projects (SWE-smith's procedural path).

    projects = envs.swe.projects.resolve_projects("data/swe")        # the checked sdists, never fetched
    result = synthesize(projects, "data/swe", seed=0, max_per_function=2, workers=2)
    source = SyntheticSource(result.folder)                          # train / valid / heldout
    source.tasks("heldout")[0]["problem_statement"]

For each project (a pinned sdist or a local folder):
  1. its files become a git repository, <folder>/repos/pypi__<name>, whose first commit is the
     clean tree (refs/heads/main);
  2. its test suite runs twice: once plainly (outcomes, durations), once traced (the code each
     test runs, mapped to the functions that code is in). A test is used only if it passed both
     times in under max_test_seconds; a function only if such a test runs it;
  3. for each covered function, mutation sites (envs.swe.mutations) are tried in a seeded order
     that goes round the mutation kinds, at most max_candidates of them, until max_per_function
     bugs are kept. A bug is run against the tests that cover its function (the max_tests most
     specific: those covering the fewest functions first, in that order, stopping after
     max_fail_to_pass failures); it is kept if some fail (FAIL_TO_PASS) and the run neither
     times out nor loses a test (PASS_TO_PASS: covering tests that ran and still pass, at most
     max_pass_to_pass). Its `patch`
     (the fix, buggy -> clean, git format) must `git apply` on the buggy file and give back the
     clean file byte for byte;
  4. "with the fix all pass": the fixed tree is the clean tree, so a function's tests are run on
     it once, selected exactly as for its bugs, and FAIL_TO_PASS / PASS_TO_PASS keep only tests
     that pass there (an order-dependent test cannot pose as a failure); at the end one run of
     all kept instances' tests on the clean tree drops any instance with a test that fails there;
  5. each kept bug becomes a commit with the buggy tree and no parent (refs/swe/<instance_id>):
     the instance's base_commit. Its history holds nothing about the fix.

Validation differs from SWE-bench's in one way, on purpose: PASS_TO_PASS is the capped set of
tests that run the mutated function and still pass, not the whole suite. Tests that never run the
function cannot see the bug (bodies only are mutated, so imports and definitions are unchanged),
so the whole-suite check would only repeat the clean run; the cap bounds the env's reward run.
test_patch is "" (the tests are already in the tree) and hints_text is "".

Problem statements are written from the failing tests' output only (their ids, and the first
one's assertion and short traceback, with machine paths and addresses removed), never from the
patch. Splits are by function: sha256 of (project, module, qualified name) puts every bug in a
function into the same one of train/valid/heldout, so no held-out bug is in code a training bug
touched. Everything is deterministic for a seed, whatever the number of workers.

Results are cached in <out_dir>/synth-<key>/ (key: the settings, the projects' pins and this
code's SYNTH_VERSION) and reused; an interrupted run resumes where it stopped (progress/).
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import os
import random
import re
import shutil
import sys
import tarfile
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from queue import Queue

from ..base import TRAIN_SPLIT, VALID_SPLIT, TaskSource
from . import mutations
from .config import SweConfig, SynthSettings
from .instances import (
    InstanceError,
    TestRun,
    apply_patch,
    git,
    load_instances,
    repo_dirname,
    run_pytest,
    write_instances,
)
from .projects import GEN_DATA_HINT, MissingDataError, Project, fetch_projects, pinned, resolve_projects, sha256_of

SYNTH_VERSION = 1
HELDOUT = "heldout"
SPLITS = (TRAIN_SPLIT, VALID_SPLIT, HELDOUT)
CREATED_AT = "2000-01-01T00:00:00Z"
BASE_MESSAGE = "base"


@dataclass
class SynthResult:
    folder: Path
    instances: list[dict]
    stats: dict

    @property
    def repos_dir(self) -> Path:
        return self.folder / "repos"


# ---------------------------------------------------------------------------------------------
# Small pieces


def split_of(project: str, module: str, qualname: str, fractions=(0.8, 0.1, 0.1)) -> str:
    """train / valid / heldout for a function, from sha256 of its (project, module, qualname)."""
    h = int(hashlib.sha256(f"{project}\n{module}\n{qualname}".encode()).hexdigest()[:16], 16) / 16**16
    total = sum(fractions)
    if h < fractions[0] / total:
        return TRAIN_SPLIT
    if h < (fractions[0] + fractions[1]) / total:
        return VALID_SPLIT
    return HELDOUT


def _lines(text: str) -> list[str]:
    return re.findall(r"[^\n]*\n|[^\n]+$", text)


def make_patch(path: str, before: str, after: str, context: int = 3) -> str:
    """A git-format unified diff turning `before` into `after` (the file at `path`)."""
    body = []
    for line in difflib.unified_diff(_lines(before), _lines(after), f"a/{path}", f"b/{path}", n=context):
        body.append(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n")
    return f"diff --git a/{path} b/{path}\n" + "".join(body) if body else ""


def _tree_hash(path: Path) -> str:
    """sha256 over a local project's files (names and bytes), or of its sdist file."""
    if path.is_file():
        return sha256_of(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and not _ignored(p.relative_to(path))):
        h.update(str(f.relative_to(path).as_posix()).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def _ignored(rel: Path) -> bool:
    return any(part in (".git", "__pycache__", ".pytest_cache") for part in rel.parts) or rel.suffix == ".pyc"


def settings_key(projects: list[Project], settings: SynthSettings) -> str:
    pins = [{"name": p.name, "version": p.version, "source": list(p.source), "tests": list(p.tests),
             "exclude": list(p.exclude), "pythonpath": list(p.pythonpath),
             "sha256": p.sha256 or _tree_hash(Path(p.path))} for p in projects]
    blob = json.dumps({"version": SYNTH_VERSION, "settings": settings.model_dump(mode="json"), "projects": pins},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def synth_folder(out_dir: str | Path, projects: list[Project], settings: SynthSettings) -> Path:
    return Path(out_dir) / f"synth-{settings_key(projects, settings)[:12]}"


_HEX = re.compile(r"0x[0-9a-fA-F]{6,}")
# The interpreter's own files, as failure texts show them.
PYTHON_ROOTS = sorted({(os.path.realpath(sys.base_prefix), "<python>"), (sys.base_prefix, "<python>"),
                       (os.path.realpath(sys.prefix), "<python>"), (sys.prefix, "<python>")})


def _normalize(text: str, roots: list[tuple[str, str]]) -> str:
    """Machine paths (longest first) replaced, memory addresses blanked."""
    for root, name in sorted(roots, key=lambda r: -len(r[0])):
        if name:
            text = re.sub(re.escape(root) + r"(?![\w.-])", name, text)
        else:  # the tree itself: paths become relative
            text = re.sub(re.escape(root) + r"(?![\w.-])/?", "", text)
    return _HEX.sub("0x...", text)


def _clip(text: str, limit: int = 3000) -> str:
    text = text.strip("\n")
    if len(text) <= limit:
        return text
    return text[: limit // 3] + "\n[...]\n" + text[-(2 * limit) // 3:]


def _internal(text: str) -> bool:
    """A failure inside pytest's own machinery (the bug broke the test runner, not a test)."""
    return re.search(r"/(_pytest|pluggy)/", text) is not None


def problem_statement(project: Project, fail_to_pass: list[str], run: TestRun, roots: list[tuple[str, str]],
                      first: str | None = None) -> str:
    """The issue text: which tests fail and how one of them (`first`, else the first) fails: the
    tests' output only."""
    first = first or fail_to_pass[0]
    shown = fail_to_pass[:10]
    out = [f"Tests of {project.name} {project.version} fail.", "", "These tests fail:", ""]
    out += [f"    {t}" for t in shown]
    if len(fail_to_pass) > len(shown):
        out.append(f"    (and {len(fail_to_pass) - len(shown)} more)")
    text = run.texts.get(first) or run.messages.get(first) or "(no output)"
    out += ["", f"Output of {first}:", "", "```", _clip(_normalize(text, roots)), "```", "",
            "They should pass. Fix the library (not its tests) without breaking the tests that pass now."]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# Repositories


def make_repo(project: Project, repos_dir: Path) -> tuple[Path, str]:
    """The project as a git repository (its clean tree the commit on refs/heads/main), made once."""
    dest = repos_dir / repo_dirname(project.repo)
    if (dest / ".git").exists():
        return dest, git(["rev-parse", "refs/heads/main"], dest).strip()
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    src = Path(project.path)
    if src.is_file():
        unpack = tmp / ".unpack"
        with tarfile.open(src) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(unpack, filter="data")
            else:  # pragma: no cover - Python < 3.11.4
                tar.extractall(unpack)  # noqa: S202
        inner = list(unpack.iterdir())
        top = inner[0] if len(inner) == 1 and inner[0].is_dir() else unpack
        for item in top.iterdir():
            shutil.move(str(item), tmp / item.name)
        shutil.rmtree(unpack)
    else:
        shutil.copytree(src, tmp, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(".git", "__pycache__", ".pytest_cache", "*.pyc"))
    for junk in sorted(tmp.rglob("__pycache__")):
        shutil.rmtree(junk, ignore_errors=True)
    for junk in sorted(tmp.rglob("*.pyc")):
        junk.unlink(missing_ok=True)
    git(["init", "-q"], tmp)
    git(["add", "-A", "-f"], tmp)
    git(["commit", "-q", "--no-verify", "-m", f"{project.name} {project.version}"], tmp)
    tmp.rename(dest)
    return dest, git(["rev-parse", "refs/heads/main"], dest).strip()


def _copy_tree(repo: Path, dest: Path) -> Path:
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(repo, dest, ignore=shutil.ignore_patterns(".git", "__pycache__"))
    return dest


# ---------------------------------------------------------------------------------------------
# Baseline: which tests pass, and which functions they run


def _source_files(project: Project, tree: Path) -> list[str]:
    files = set()
    for src in project.source:
        p = tree / src
        cands = [p] if p.is_file() else sorted(p.rglob("*.py"))
        for f in cands:
            rel = f.relative_to(tree).as_posix()
            if f.suffix == ".py" and not any(rel == e or rel.startswith(e.rstrip("/") + "/") for e in project.exclude):
                files.add(rel)
    return sorted(files)


def baseline(project: Project, repo: Path, folder: Path, settings: SynthSettings) -> dict:
    """The project's stable tests and covered functions, cached in <out_dir>/baselines/ (shared by
    every seed and setting but max_test_seconds)."""
    pin = project.sha256 or _tree_hash(Path(project.path))
    name = f"{project.name}-{project.version}-{pin[:12]}-t{settings.max_test_seconds:g}-v{SYNTH_VERSION}.json"
    cache = folder.parent / "baselines" / name
    if cache.exists():
        return json.loads(cache.read_text())
    start = time.perf_counter()
    slot = _copy_tree(repo, folder / "work" / project.name / "baseline")
    scratch = folder / "work" / project.name / "baseline-run"
    plain = run_pytest(slot, None, paths=project.tests, timeout=3600, pythonpath=project.pythonpath, scratch=scratch)
    if plain.timed_out or not plain.outcomes:
        raise RuntimeError(f"{project.name}: the test suite did not run:\n{plain.output[-3000:]}")
    fast = sorted(t for t, o in plain.outcomes.items()
                  if o == "passed" and plain.durations.get(t, 0.0) <= settings.max_test_seconds)
    traced = run_pytest(slot, fast, timeout=3600, pythonpath=project.pythonpath, trace=".", scratch=scratch)
    stable = [t for t in fast if traced.outcomes.get(t) == "passed"]

    units_by_file: dict[str, list[mutations.Unit]] = {}
    for rel in _source_files(project, slot):
        try:
            text = (slot / rel).read_text(encoding="utf-8")
            units_by_file[rel] = mutations.units(text, rel, mutations.module_name(rel, project.pythonpath))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
    test_units: dict[str, set[str]] = {}
    for t in stable:
        found = set()
        for rel, line in traced.covers.get(t, ()):
            for u in units_by_file.get(rel, ()):
                if u.start <= line <= u.end:
                    found.add(u.key)
                    break
        test_units[t] = found
    covering: dict[str, list[str]] = {}
    for t, keys in test_units.items():
        for k in keys:
            covering.setdefault(k, []).append(t)
    for k in covering:  # the most specific tests first
        covering[k].sort(key=lambda t: (len(test_units[t]), t))
    units = [u.__dict__ for us in units_by_file.values() for u in us]
    out = {
        "project": project.name,
        "tests": {t: plain.durations.get(t, 0.0) for t in stable},
        "units": units,
        "covering": covering,
        "counts": {"collected": len(plain.outcomes), "passed": sum(o == "passed" for o in plain.outcomes.values()),
                   "fast": len(fast), "stable": len(stable), "units": len(units), "covered_units": len(covering)},
        "seconds": {"plain": plain.seconds, "traced": traced.seconds, "total": time.perf_counter() - start},
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.with_suffix(".tmp").write_text(json.dumps(out))
    cache.with_suffix(".tmp").replace(cache)
    return out


# ---------------------------------------------------------------------------------------------
# Per-function synthesis


def _order(sites: list[mutations.Site], rng: random.Random) -> list[mutations.Site]:
    """Sites in a seeded order that goes round the kinds (each kind's sites shuffled)."""
    by_kind: dict[str, list[mutations.Site]] = {}
    for s in sites:
        by_kind.setdefault(s.kind, []).append(s)
    kinds = sorted(by_kind)
    rng.shuffle(kinds)
    for k in kinds:
        rng.shuffle(by_kind[k])
    out = []
    for i in range(max((len(v) for v in by_kind.values()), default=0)):
        out += [by_kind[k][i] for k in kinds if i < len(by_kind[k])]
    return out


class _Project:
    """What the workers of one project share."""

    def __init__(self, project: Project, repo: Path, clean: str, base: dict, folder: Path, settings: SynthSettings,
                 workers: int):
        self.project, self.repo, self.clean, self.base, self.settings = project, repo, clean, base, settings
        self.work = folder / "work" / project.name
        self.sources: dict[str, str] = {}
        self.slots: Queue = Queue()
        for i in range(workers):
            self.slots.put(_copy_tree(repo, self.work / f"slot{i}"))
        self.lock = threading.Lock()

    def source(self, rel: str) -> str:
        with self.lock:
            if rel not in self.sources:
                self.sources[rel] = (self.repo / rel).read_bytes().decode("utf-8")
            return self.sources[rel]


def _synth_unit(ctx: _Project, unit: mutations.Unit) -> dict:
    s, p = ctx.settings, ctx.project
    tests = ctx.base["covering"][unit.key][: s.max_tests]
    timeout = _timeout(ctx, tests)
    source = ctx.source(unit.file)
    clean_bytes = source.encode("utf-8")
    rng = random.Random(f"{s.seed}/{p.name}/{unit.key}")
    order = _order([x for x in mutations.sites(source, unit) if x.kind in s.kinds], rng)
    start = time.perf_counter()
    kept, reasons, seen, tried = [], Counter(), set(), 0
    clean_pass: set[str] | None = None  # the tests that pass on the clean tree, run just as the bugs are
    slot = ctx.slots.get()
    scratch = slot.with_name(slot.name + "-run")
    try:
        for site in order:
            if len(kept) >= s.max_per_function or tried >= s.max_candidates:
                break
            mut = mutations.materialize(source, unit, site)
            if mut is None or mut.text in seen:
                reasons["unwritable" if mut is None else "duplicate"] += 1
                continue
            seen.add(mut.text)
            tried += 1
            target = slot / unit.file
            target.write_bytes(mut.text.encode("utf-8"))
            try:
                run = run_pytest(slot, tests, timeout=timeout, pythonpath=p.pythonpath, scratch=scratch,
                                 maxfail=s.max_fail_to_pass)
                verdict = _judge(run, tests, s)
                if verdict[0] is None:
                    patch = make_patch(unit.file, mut.text, source)
                    try:
                        apply_patch(slot, patch, "the fix")  # buggy -> clean, as git applies it
                        if target.read_bytes() != clean_bytes:
                            verdict = ("patch_mismatch", [], [])
                    except InstanceError:
                        verdict = ("patch_mismatch", [], [])
            finally:
                target.write_bytes(clean_bytes)
            reason, f2p, p2p = verdict
            if reason is None:
                if clean_pass is None:  # with the fix (the clean tree), the same tests, the same way
                    clean = run_pytest(slot, tests, timeout=timeout, pythonpath=p.pythonpath, scratch=scratch)
                    clean_pass = set() if clean.timed_out else set(clean.passed(tests))
                f2p = [t for t in f2p if t in clean_pass][: s.max_fail_to_pass]
                p2p = [t for t in p2p if t in clean_pass][: s.max_pass_to_pass]
                if not f2p:
                    reason = "fails_clean"
            if reason is not None:
                reasons[reason] += 1
                continue
            shown = [t for t in f2p if not _internal(run.texts.get(t, ""))]
            if not shown:
                reasons["pytest_internal"] += 1
                continue
            roots = [(str(slot.resolve()), ""), (str((scratch / "tmp").resolve()), "<tmp>"),
                     (str(scratch.resolve()), "<run>"), *PYTHON_ROOTS]
            kept.append(_instance(ctx, unit, mut, patch, f2p, p2p, run, roots, shown[0]))
    except InstanceError as e:
        reasons["error"] += 1
        reasons[f"error: {str(e)[:200]}"] += 1
    finally:
        ctx.slots.put(slot)
    return {"unit": unit.key, "tried": tried, "kept": kept, "reasons": dict(reasons),
            "seconds": round(time.perf_counter() - start, 3)}


def _timeout(ctx: _Project, tests: list[str]) -> float:
    return ctx.settings.timeout_base_s + ctx.settings.timeout_factor * sum(ctx.base["tests"][t] for t in tests)


def _judge(run: TestRun, tests: list[str], s: SynthSettings) -> tuple[str | None, list[str], list[str]]:
    if run.timed_out:
        return "timeout", [], []
    if run.collect_errors or (not run.stopped and any(run.outcomes.get(t) == "missing" for t in tests)):
        return "collect_error", [], []
    f2p = run.failed(tests)
    if not f2p:
        return "survived", [], []
    return None, f2p, run.passed(tests)


def _instance(ctx: _Project, unit: mutations.Unit, mut: mutations.Mutation, patch: str, f2p: list[str],
              p2p: list[str], run: TestRun, roots: list[tuple[str, str]], first: str) -> dict:
    p = ctx.project
    digest = hashlib.sha256(patch.encode()).hexdigest()[:8]
    iid = f"{p.name}__{unit.module}.{unit.qualname}__{mut.site.kind}-{digest}"
    return {
        "instance_id": iid,
        "repo": p.repo,
        "base_commit": "",  # the buggy commit, made at the end
        "problem_statement": problem_statement(p, f2p, run, roots, first),
        "hints_text": "",
        "patch": patch,
        "test_patch": "",
        "FAIL_TO_PASS": f2p,
        "PASS_TO_PASS": p2p,
        "version": p.version,
        "created_at": CREATED_AT,
        "split": split_of(p.name, unit.module, unit.qualname, ctx.settings.split_fractions),
        "synth": {
            "project": p.name, "file": unit.file, "module": unit.module, "function": unit.qualname,
            "def_line": unit.lineno, "line": mut.line, "kind": mut.site.kind, "mutation": mut.label,
            "site": [mut.site.kind, mut.site.index, mut.site.variant], "clean_commit": ctx.clean,
            "seed": ctx.settings.seed, "pythonpath": list(p.pythonpath),
            "tests_run": len(ctx.base["covering"][unit.key][: ctx.settings.max_tests]),
        },
    }


def _final_check(ctx: _Project, instances: list[dict]) -> tuple[list[dict], int, float]:
    """Every kept instance's tests on the clean tree (= each buggy tree with its fix), in one run."""
    tests = sorted({t for inst in instances for t in inst["FAIL_TO_PASS"] + inst["PASS_TO_PASS"]})
    if not tests:
        return instances, 0, 0.0
    slot = ctx.slots.get()
    try:
        run = run_pytest(slot, tests, timeout=_timeout(ctx, tests), pythonpath=ctx.project.pythonpath,
                         scratch=slot.with_name(slot.name + "-run"))
    finally:
        ctx.slots.put(slot)
    good = set(run.passed(tests)) if not run.timed_out else set()
    kept = [i for i in instances if all(t in good for t in i["FAIL_TO_PASS"] + i["PASS_TO_PASS"])]
    return kept, len(instances) - len(kept), run.seconds


def _commit_bugs(ctx: _Project, instances: list[dict], units: dict[str, mutations.Unit]) -> None:
    """A parentless commit of each instance's buggy tree, on refs/swe/<instance_id>."""
    repo = ctx.repo
    refs = []
    with tempfile.TemporaryDirectory() as tmp:
        index = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
        modes: dict[str, str] = {}
        for inst in instances:
            meta = inst["synth"]
            unit = units[f"{meta['module']}:{meta['function']}:{meta['def_line']}"]
            mut = mutations.materialize(ctx.source(meta["file"]), unit, mutations.Site(*meta["site"]))
            buggy = Path(tmp) / "buggy"
            buggy.write_bytes(mut.text.encode("utf-8"))
            blob = git(["hash-object", "-w", str(buggy)], repo).strip()
            if meta["file"] not in modes:
                modes[meta["file"]] = git(["ls-tree", ctx.clean, "--", meta["file"]], repo).split()[0]
            git(["read-tree", ctx.clean], repo, env=index)
            git(["update-index", "--cacheinfo", f"{modes[meta['file']]},{blob},{meta['file']}"], repo, env=index)
            tree = git(["write-tree"], repo, env=index).strip()
            inst["base_commit"] = git(["commit-tree", tree, "-m", BASE_MESSAGE], repo).strip()
            refs.append(f"update refs/swe/{inst['instance_id']} {inst['base_commit']}\n")
    if refs:
        git(["update-ref", "--stdin"], repo, input="".join(refs))


# ---------------------------------------------------------------------------------------------
# The entry


def synthesize(projects: list[Project], out_dir: str | Path, seed: int | None = None,
               max_per_function: int | None = None, workers: int = 2, progress: bool = True,
               settings: SynthSettings | None = None, **overrides) -> SynthResult:
    """Synthesize and validate instances in the projects (each with `path` set: see
    projects.resolve_projects and projects.local_project); cached in <out_dir>/synth-<key>/.
    seed, max_per_function and **overrides (SynthSettings fields) override `settings`."""
    from tqdm import tqdm

    given = {"seed": seed, "max_per_function": max_per_function, **overrides}
    base = settings.model_dump() if settings is not None else {}
    settings = SynthSettings(**{**base, **{k: v for k, v in given.items() if v is not None}})
    for p in projects:
        if p.path is None:
            raise MissingDataError(f"project {p.name} has no path; resolve_projects() sets it ({GEN_DATA_HINT})")
    folder = synth_folder(out_dir, projects, settings).resolve()
    if (folder / "stats.json").exists() and (folder / "instances.jsonl").exists():
        return SynthResult(folder, load_synthetic(folder), json.loads((folder / "stats.json").read_text()))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "settings.json").write_text(json.dumps(
        {"settings": settings.model_dump(mode="json"), "projects": [p.name for p in projects],
         "synth_version": SYNTH_VERSION}, indent=2))
    all_instances, stats = [], {"projects": {}, "settings": settings.model_dump(mode="json")}
    t_all = time.perf_counter()
    for p in projects:
        t0 = time.perf_counter()
        repo, clean = make_repo(p, folder / "repos")
        base = baseline(p, repo, folder, settings)
        t_base = time.perf_counter() - t0
        units = {u["module"] + ":" + u["qualname"] + ":" + str(u["lineno"]): mutations.Unit(**u) for u in base["units"]}
        todo = [units[k] for k in sorted(base["covering"], key=lambda k: (units[k].file, units[k].lineno, k))]
        if settings.max_functions is not None:
            rank = sorted(todo, key=lambda u: hashlib.sha256(f"{settings.seed}/{u.key}".encode()).hexdigest())
            chosen = {u.key for u in rank[: settings.max_functions]}
            todo = [u for u in todo if u.key in chosen]
        done_file = folder / "progress" / f"{p.name}.jsonl"
        done = {}
        if done_file.exists():
            for line in done_file.read_text().splitlines():
                r = json.loads(line)
                done[r["unit"]] = r
        ctx = _Project(p, repo, clean, base, folder, settings, workers)
        t1 = time.perf_counter()
        pending = [u for u in todo if u.key not in done]
        done_file.parent.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(max(1, workers)) as pool, done_file.open("a") as log, \
                tqdm(total=len(todo), initial=len(todo) - len(pending), desc=f"synth {p.name}", unit="fn",
                     disable=not progress) as bar:
            futures = [pool.submit(_synth_unit, ctx, u) for u in pending]
            kept_so_far = sum(len(r["kept"]) for r in done.values())
            for fut in futures:
                r = fut.result()
                done[r["unit"]] = r
                log.write(json.dumps(r) + "\n")
                log.flush()
                kept_so_far += len(r["kept"])
                bar.update(1)
                bar.set_postfix(kept=kept_so_far)
        t_synth = time.perf_counter() - t1
        results = [done[u.key] for u in todo]
        instances = [inst for r in results for inst in r["kept"]]
        instances, dropped, t_final = _final_check(ctx, instances)
        _commit_bugs(ctx, instances, units)
        shutil.rmtree(folder / "work" / p.name, ignore_errors=True)
        reasons = Counter()
        for r in results:
            reasons.update(r["reasons"])
        attempts = sum(r["tried"] for r in results)
        stats["projects"][p.name] = {
            "version": p.version,
            "baseline": base["counts"],
            "functions_tried": len(todo),
            "functions_with_instances": sum(bool(r["kept"]) for r in results),
            "attempts": attempts,
            "instances": len(instances),
            "dropped_by_final_check": dropped,
            "rejected": {k: v for k, v in sorted(reasons.items())},
            "splits": dict(Counter(i["split"] for i in instances)),
            "kinds": dict(sorted(Counter(i["synth"]["kind"] for i in instances).items())),
            "seconds": {"baseline": round(t_base, 2), "validation": round(t_synth, 2),
                        "final_check": round(t_final, 2)},
            "attempts_per_s": round(attempts / t_synth, 3) if t_synth and pending else None,
            "instances_per_s": round(len(instances) / t_synth, 3) if t_synth and pending else None,
            # per worker, from each function's own time (also right for a resumed run)
            "worker_seconds": round(sum(r.get("seconds", 0.0) for r in results), 1),
        }
        all_instances += instances
    shutil.rmtree(folder / "work", ignore_errors=True)
    total = time.perf_counter() - t_all
    val = sum(s["seconds"]["validation"] for s in stats["projects"].values())
    attempts = sum(s["attempts"] for s in stats["projects"].values())
    stats.update({
        "instances": len(all_instances),
        "splits": dict(Counter(i["split"] for i in all_instances)),
        "kinds": dict(sorted(Counter(i["synth"]["kind"] for i in all_instances).items())),
        "attempts": attempts,
        "workers": workers,
        "seconds": round(total, 2),
        "instances_per_s": round(len(all_instances) / total, 3) if total else None,
        "validation_instances_per_s": round(len(all_instances) / val, 3) if val else None,
        "validation_attempts_per_s": round(attempts / val, 3) if val else None,
    })
    write_instances(all_instances, folder / "instances.jsonl")
    (folder / "stats.json").write_text(json.dumps(stats, indent=2))
    return SynthResult(folder, all_instances, stats)


def load_synthetic(folder: str | Path) -> list[dict]:
    """The instances of a synthesis folder (checked like any user's file)."""
    path = Path(folder) / "instances.jsonl"
    if not path.exists():
        raise MissingDataError(f"no synthesized instances in {folder}; {GEN_DATA_HINT}")
    return load_instances(path)


class SyntheticSource(TaskSource):
    """Synthesized instances split into train / valid / heldout (by function); repos under repos_dir."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.repos_dir = self.folder / "repos"
        self._instances = load_synthetic(self.folder)

    def splits(self) -> list[str]:
        return list(SPLITS)

    def tasks(self, split: str) -> list[dict]:
        self._check_split(split)
        return [json.loads(json.dumps(i)) for i in self._instances if i["split"] == split]

    def task_key(self, task: dict) -> str:
        return task["instance_id"]


def open_synthetic(out_dir: str | Path, projects: list[Project] | None = None,
                   settings: SynthSettings | None = None) -> SyntheticSource:
    """The instances synthesized for these projects and settings, without synthesizing or fetching:
    MissingDataError naming `launch.py gen-data` if they are not there."""
    projects = pinned() if projects is None else projects
    if any(p.path is None and p.sha256 is None for p in projects):
        raise MissingDataError(f"local projects need a path; {GEN_DATA_HINT}")
    folder = synth_folder(out_dir, projects, settings or SynthSettings())
    if not (folder / "stats.json").exists():
        raise MissingDataError(f"no synthesized SWE instances at {folder}; {GEN_DATA_HINT}")
    return SyntheticSource(folder)


def prepare(cache_dir: str | Path, projects: list[Project] | None = None, workers: int = 2, progress: bool = True,
            settings: SynthSettings | None = None) -> SynthResult:
    """Data preparation (launch.py gen-data): fetch the pinned sdists, then synthesize."""
    settings = settings or SynthSettings()
    resolved = fetch_projects(cache_dir, projects)
    return synthesize(resolved, cache_dir, workers=workers, progress=progress, settings=settings)


def prepare_config(config: SweConfig, progress: bool = True) -> dict | None:
    """`launch.py gen-data` for env swe: fetch the config's pinned projects (hashes checked) and
    synthesize their instances with its settings (cached, resumable). A user's instances file
    (env.instances_file) needs neither: None."""
    if config.instances_file:
        return None
    res = prepare(config.cache_dir, pinned(config.projects), workers=config.gen_workers, progress=progress,
                  settings=config.synth)
    print(f"swe: {len(res.instances)} instances in {res.folder}")
    return res.stats


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Synthesize SWE instances from the pinned projects.")
    ap.add_argument("--cache", default="data/swe")
    ap.add_argument("--projects", nargs="*", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-per-function", type=int, default=2)
    ap.add_argument("--max-candidates", type=int, default=6)
    ap.add_argument("--max-functions", type=int, default=None)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--fetch", action="store_true", help="download the pinned sdists first")
    a = ap.parse_args(argv)
    chosen = pinned(a.projects)
    resolved = fetch_projects(a.cache, chosen) if a.fetch else resolve_projects(a.cache, chosen)
    res = synthesize(resolved, a.cache, seed=a.seed, max_per_function=a.max_per_function, workers=a.workers,
                     max_candidates=a.max_candidates, max_functions=a.max_functions)
    print(json.dumps(res.stats, indent=2))
    print(res.folder)


if __name__ == "__main__":
    main()
