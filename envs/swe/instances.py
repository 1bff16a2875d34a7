"""SWE task instances in SWE-Gym's format: loading, checking, materialising, and running their tests.

An instance is a dict with SWE-Gym's / SWE-bench's fields (extra keys are kept):

    instance_id        unique name, e.g. "getmoto__moto-5752"
    repo               "owner/name"; its git repository lives under repos_dir (find_repo)
    base_commit        the commit the agent starts from (the bug is in it)
    problem_statement  the issue text the agent reads
    hints_text         extra text (SWE-bench: issue comments before the fix); may be ""
    patch              the reference fix, a unified diff that `git apply` takes on base_commit
    test_patch         a diff adding/changing tests, applied before tests are run; may be ""
    FAIL_TO_PASS       test ids that fail on base_commit (+ test_patch) and pass with `patch`
    PASS_TO_PASS       test ids that pass both before and after
    version            the project's version
    created_at         when the instance was made (ISO 8601 text)

SWE-bench files store FAIL_TO_PASS / PASS_TO_PASS as JSON text of a list; SWE-Gym as lists: both
are read. load_instances() reads a user's JSON (a list of objects) or JSONL file and names the
instance and the field of any malformed one. Repositories are local git clones (bare or not) or
git bundles under repos_dir, named "owner__name" (SWE-bench's convention), "owner/name" or "name".

checkout() writes an instance's tree into a fresh folder. By default it is a new one-commit
repository with no history: the source repository may hold later commits (for synthesized
instances, the clean tree itself), and an agent must not be able to read the fix from git.

run_pytest() runs test ids in a tree in a subprocess (new session, killed as a process group on
timeout) with a small pytest plugin that reports every test's outcome, failure text and,
optionally, the code it ran (for mapping tests to functions). validate_instance() is SWE-bench's
check: FAIL_TO_PASS fail and PASS_TO_PASS pass on the instance's tree, then all pass with `patch`.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

SWE_FIELDS = ("instance_id", "repo", "base_commit", "problem_statement", "hints_text", "patch", "test_patch",
              "FAIL_TO_PASS", "PASS_TO_PASS", "version", "created_at")

# Commits we write (checkout's one-commit repositories, synthesized repositories) carry this
# identity and date, so the same tree always gives the same commit id.
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "Turnstile", "GIT_AUTHOR_EMAIL": "swe@turnstile.invalid",
    "GIT_COMMITTER_NAME": "Turnstile", "GIT_COMMITTER_EMAIL": "swe@turnstile.invalid",
    "GIT_AUTHOR_DATE": "2000-01-01T00:00:00+0000", "GIT_COMMITTER_DATE": "2000-01-01T00:00:00+0000",
}


class InstanceError(ValueError):
    """A malformed instance, a missing repository or commit, or a patch that does not apply; the
    message names the file, the instance and the field."""


class SweInstance(BaseModel):
    """The schema of one instance (extra keys are allowed and kept)."""

    model_config = ConfigDict(extra="allow")

    instance_id: str = Field(min_length=1)
    repo: str = Field(pattern=r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$", description="owner/name")
    base_commit: str = Field(pattern=r"^[0-9a-f]{7,64}$", description="a commit id (hex)")
    problem_statement: str = Field(min_length=1)
    hints_text: str = ""
    patch: str = Field(min_length=1)
    test_patch: str = ""
    FAIL_TO_PASS: list[str] = Field(min_length=1)
    PASS_TO_PASS: list[str] = []
    version: str = ""
    created_at: str = ""

    @field_validator("FAIL_TO_PASS", "PASS_TO_PASS", mode="before")
    @classmethod
    def _json_list(cls, v: Any) -> Any:
        if isinstance(v, str):  # SWE-bench stores these lists as JSON text
            try:
                return json.loads(v)
            except json.JSONDecodeError as e:
                raise ValueError(f"not a list, nor JSON text of a list ({e})") from None
        return v

    @field_validator("FAIL_TO_PASS", "PASS_TO_PASS")
    @classmethod
    def _test_ids(cls, v: list[str]) -> list[str]:
        bad = [t for t in v if not t.strip()]
        if bad:
            raise ValueError("holds an empty test id")
        return v

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, v: Any) -> Any:
        return str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v

    @field_validator("hints_text", "test_patch", mode="before")
    @classmethod
    def _none_is_empty(cls, v: Any) -> Any:
        return "" if v is None else v

    @field_validator("patch", "test_patch")
    @classmethod
    def _diff(cls, v: str) -> str:
        if v and not re.search(r"^(diff --git |--- )", v, re.M):
            raise ValueError("is not a unified diff (no 'diff --git' or '---' line)")
        return v


def check_instance(raw: Any, where: str = "") -> dict:
    """The instance as a plain dict with its fields normalised; InstanceError naming `where`, the
    instance and the first bad field otherwise."""
    prefix = f"{where}: " if where else ""
    if not isinstance(raw, dict):
        raise InstanceError(f"{prefix}an instance must be a JSON object, got {type(raw).__name__}")
    name = raw.get("instance_id")
    who = f"instance {name!r}" if isinstance(name, str) and name else "instance (no instance_id)"
    try:
        inst = SweInstance.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        name, *inner = err["loc"] or ("?",)
        at = f" (at {'.'.join(str(x) for x in inner)})" if inner else ""
        more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
        raise InstanceError(f"{prefix}{who}, field {str(name)!r}{at}: {err['msg']}{more}") from None
    return inst.model_dump()


def load_instances(path: str | Path, repos_dir: str | Path | None = None, check_commits: bool = False) -> list[dict]:
    """The instances of a SWE-Gym / SWE-bench JSON file (a list of objects, or {"instances": [...]})
    or JSONL file (one object a line). With repos_dir, every instance's repository must be there
    (and with check_commits, its base_commit in it). Errors name the file and line (JSONL) or index
    (JSON), the instance and the field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise InstanceError(f"{path}: cannot read instances ({e})") from None
    records: list[tuple[str, Any]] = []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg != "Extra data" and path.suffix != ".jsonl":
            raise InstanceError(f"{path}: not JSON: {e}") from None
        data = None
    if data is None:  # JSONL
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append((f"{path}:{n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise InstanceError(f"{path}:{n}: not JSON: {e}") from None
    else:
        if isinstance(data, dict) and isinstance(data.get("instances"), list):
            data = data["instances"]
        if isinstance(data, dict):
            data = [data]
        if not isinstance(data, list):
            raise InstanceError(f"{path}: expected a list of instances, got {type(data).__name__}")
        records = [(f"{path}[{i}]", d) for i, d in enumerate(data)]
    out, seen = [], {}
    for where, raw in records:
        inst = check_instance(raw, where)
        if inst["instance_id"] in seen:
            raise InstanceError(f"{where}: instance {inst['instance_id']!r}, field 'instance_id': "
                                f"duplicate (first at {seen[inst['instance_id']]})")
        seen[inst["instance_id"]] = where
        out.append(inst)
    if repos_dir is not None:
        for (where, _), inst in zip(records, out):
            try:
                repo = find_repo(inst["repo"], repos_dir)
                if check_commits and not has_commit(repo, inst["base_commit"]):
                    raise InstanceError(f"commit {inst['base_commit']} is not in {repo}")
            except InstanceError as e:
                field_ = "base_commit" if check_commits and "commit" in str(e) else "repo"
                raise InstanceError(f"{where}: instance {inst['instance_id']!r}, field {field_!r}: {e}") from None
    return out


def write_instances(instances: Iterable[dict], path: str | Path) -> Path:
    """Instances as JSONL (one per line, keys in SWE-Gym's order first)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for inst in instances:
            ordered = {k: inst[k] for k in SWE_FIELDS if k in inst} | {k: v for k, v in inst.items()
                                                                         if k not in SWE_FIELDS}
            f.write(json.dumps(ordered, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


# ---------------------------------------------------------------------------------------------
# Processes and git


@dataclass
class Completed:
    """What a command did (the same fields as envs.swe.sandbox's RunResult)."""

    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    seconds: float = 0.0


def run_command(cmd: list[str], cwd: str | Path, timeout: float | None = None, env: dict | None = None,
                input: str | None = None) -> Completed:
    """Run cmd in its own session; on timeout the whole process group is killed."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=str(cwd), env=env, stdin=subprocess.PIPE if input is not None else
                            subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, errors="replace", start_new_session=True)
    try:
        out, err = proc.communicate(input=input, timeout=timeout)
        return Completed(proc.returncode, out, err, False, time.perf_counter() - start)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, err = proc.communicate()
        return Completed(None, out or "", err or "", True, time.perf_counter() - start)


def _git_env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(GIT_IDENTITY)
    env["GIT_CONFIG_NOSYSTEM"] = "1"
    env["GIT_TERMINAL_PROMPT"] = "0"
    env.update(extra or {})
    return env


def git(args: list[str], cwd: str | Path, env: dict | None = None, input: str | None = None,
        check: bool = True, timeout: float = 300) -> str:
    """`git args` in cwd (our identity and dates, no user or system config); stdout, or an
    InstanceError with git's message."""
    cmd = ["git", "-c", "core.autocrlf=false", "-c", "init.defaultBranch=main", "-c", "gc.auto=0",
           "-c", "commit.gpgsign=false", *args]
    res = run_command(cmd, cwd, timeout=timeout, env=_git_env(env), input=input)
    if check and (res.timed_out or res.returncode != 0):
        raise InstanceError(f"git {' '.join(args[:3])} failed in {cwd}: {(res.stderr or res.stdout).strip()[-800:]}")
    return res.stdout


def repo_dirname(repo: str) -> str:
    """SWE-bench's folder name for a repository: owner__name."""
    return repo.replace("/", "__")


def find_repo(repo: str, repos_dir: str | Path) -> Path:
    """The local clone (a folder holding .git, or a bare repository) or bundle of `repo`."""
    root = Path(repos_dir)
    owner, _, name = repo.partition("/")
    tried = []
    for base in (root / repo_dirname(repo), root / owner / name, root / name):
        for cand in (base, base.with_name(base.name + ".git")):
            tried.append(cand)
            if (cand / ".git").exists() or ((cand / "HEAD").is_file() and (cand / "objects").is_dir()):
                return cand
        bundle = base.with_name(base.name + ".bundle")
        tried.append(bundle)
        if bundle.is_file():
            return bundle
    raise InstanceError(f"repository {repo!r} not found under {root} (looked for "
                        f"{', '.join(str(t.relative_to(root)) for t in tried)})")


def _readable_repo(repo: Path, scratch: Path) -> Path:
    """A git dir to read objects from: the repository itself, or a bare clone of a bundle."""
    if repo.is_file():  # a bundle
        bare = scratch / "bundle.git"
        if not bare.exists():
            git(["clone", "-q", "--bare", str(repo), str(bare)], scratch)
        return bare
    return repo


def has_commit(repo: Path, commit: str) -> bool:
    with tempfile.TemporaryDirectory() as scratch:
        src = _readable_repo(Path(repo), Path(scratch))
        return run_command(["git", "cat-file", "-e", f"{commit}^{{commit}}"], src, env=_git_env()).returncode == 0


def checkout(instance: dict, repos_dir: str | Path, dest: str | Path, history: bool = False,
             commit: str | None = None) -> Path:
    """Write the tree of the instance's base_commit (or `commit`) into dest (which must not exist or
    be empty). history=False (the default): dest becomes a new repository with that tree as its
    one commit, so `git diff` shows the agent's changes and nothing else is reachable.
    history=True: a clone checked out at the commit (all of the source's history included)."""
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise InstanceError(f"checkout of {instance['instance_id']!r}: {dest} is not empty")
    dest.mkdir(parents=True, exist_ok=True)
    repo = find_repo(instance["repo"], repos_dir)
    rev = commit or instance["base_commit"]
    if history:
        git(["clone", "-q", "--no-checkout", "--no-hardlinks", str(repo.resolve()), str(dest)], dest.parent)
        try:
            git(["checkout", "-q", "--detach", rev], dest)
        except InstanceError:
            raise InstanceError(f"instance {instance['instance_id']!r}, field 'base_commit': commit {rev} "
                                f"is not in {repo}") from None
        return dest
    with tempfile.TemporaryDirectory() as scratch:
        src = _readable_repo(repo, Path(scratch)).resolve()
        index = {"GIT_INDEX_FILE": str(Path(scratch) / "index")}
        try:
            git(["--git-dir", str(_git_dir(src)), "--work-tree", str(dest.resolve()), "read-tree", rev],
                dest, env=index)
        except InstanceError:
            raise InstanceError(f"instance {instance['instance_id']!r}, field 'base_commit': commit {rev} "
                                f"is not in {repo}") from None
        git(["--git-dir", str(_git_dir(src)), "--work-tree", str(dest.resolve()), "checkout-index", "-a", "-f"],
            dest, env=index)
    git(["init", "-q"], dest)
    git(["add", "-A", "-f"], dest)
    git(["commit", "-q", "--no-verify", "-m", "base"], dest)
    return dest


def _git_dir(repo: Path) -> Path:
    return repo / ".git" if (repo / ".git").exists() else repo


def apply_patch(tree: str | Path, patch: str, what: str = "patch", reverse: bool = False) -> None:
    """`git apply` a unified diff to the files of tree (a repository or a plain folder)."""
    if not patch.strip():
        return
    tree = Path(tree).resolve()
    args = ["apply", "--whitespace=nowarn"] + (["-R"] if reverse else []) + ["-"]
    # A plain folder inside some other repository must not make git apply paths to that one.
    res = run_command(["git", *args], tree, timeout=120, input=patch,
                      env=_git_env({"GIT_CEILING_DIRECTORIES": str(tree.parent)}))
    if res.returncode != 0:
        raise InstanceError(f"{what} does not apply in {tree}: {(res.stderr or res.stdout).strip()[-800:]}")


# ---------------------------------------------------------------------------------------------
# Running tests

# The pytest plugin run_pytest loads (-p turnstile_swe_plugin): written to a temp folder, it keeps
# the test process free of our packages. Outcomes per test id: passed, failed (in the test),
# error (in setup/teardown), skipped, xfailed.
PLUGIN_NAME = "turnstile_swe_plugin"
PLUGIN_SOURCE = r'''
"""Turnstile's pytest plugin for SWE test runs: outcomes, failure texts and covered code as JSON."""
import json
import os
import sys
import threading

import pytest

_tests = {}
_collect_errors = []
_cwd = os.getcwd()
_trace_root = None


def pytest_addoption(parser):
    group = parser.getgroup("turnstile-swe")
    group.addoption("--swe-out", default=None, help="write the results here (JSON)")
    group.addoption("--swe-select", default=None, help="a JSON list of the test ids to run, in that order")
    group.addoption("--swe-trace", default=None, help="record the code each test runs under this folder")


def pytest_configure(config):
    global _trace_root
    root = config.getoption("--swe-trace")
    _trace_root = os.path.realpath(root) + os.sep if root else None


def pytest_collection_modifyitems(session, config, items):
    path = config.getoption("--swe-select")
    if not path:
        return
    with open(path, encoding="utf-8") as f:
        order = {nodeid: i for i, nodeid in enumerate(json.load(f))}
    keep = sorted((item for item in items if item.nodeid in order), key=lambda item: order[item.nodeid])
    drop = [item for item in items if item.nodeid not in order]
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep


def pytest_collectreport(report):
    if report.failed:
        _collect_errors.append({"nodeid": report.nodeid, "text": str(report.longrepr)[-4000:]})


def _entry(nodeid):
    return _tests.setdefault(nodeid, {"outcome": None, "duration": 0.0})


def pytest_runtest_logreport(report):
    t = _entry(report.nodeid)
    t["duration"] += getattr(report, "duration", 0.0) or 0.0
    if report.failed:
        if t["outcome"] not in ("failed", "error"):
            t["outcome"] = "failed" if report.when == "call" else "error"
            t["text"] = report.longreprtext[-6000:]
            crash = getattr(report.longrepr, "reprcrash", None)
            t["message"] = crash.message[-2000:] if crash is not None else ""
    elif report.skipped:
        if t["outcome"] in (None, "passed"):
            t["outcome"] = "xfailed" if hasattr(report, "wasxfail") else "skipped"
    elif report.when == "call" and t["outcome"] is None:
        t["outcome"] = "passed"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if _trace_root is None:
        yield
        return
    seen = set()

    def tracer(frame, event, arg):
        seen.add(frame.f_code)

    threading.settrace(tracer)
    sys.settrace(tracer)
    try:
        yield
    finally:
        sys.settrace(None)
        threading.settrace(None)
    files, covered = {}, set()
    for code in seen:
        rel = files.get(code.co_filename)
        if rel is None:
            path = os.path.realpath(os.path.join(_cwd, code.co_filename))
            rel = files[code.co_filename] = path[len(_trace_root):] if path.startswith(_trace_root) else ""
        if rel:
            covered.add((rel.replace(os.sep, "/"), code.co_firstlineno))
    _entry(item.nodeid)["covers"] = sorted(covered)


def pytest_sessionfinish(session, exitstatus):
    path = session.config.getoption("--swe-out")
    if path:
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump({"tests": _tests, "collect_errors": _collect_errors, "exitstatus": int(exitstatus)}, f)
        os.replace(path + ".tmp", path)
'''


@dataclass
class TestRun:
    """One pytest run: each test id's outcome (passed, failed, error, skipped, xfailed; "missing" if a
    requested id never ran), failure texts, durations and (traced runs) covered code."""

    __test__ = False  # not a pytest test class

    outcomes: dict[str, str] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)
    messages: dict[str, str] = field(default_factory=dict)
    durations: dict[str, float] = field(default_factory=dict)
    covers: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    collect_errors: list[dict] = field(default_factory=list)
    returncode: int | None = None
    timed_out: bool = False
    stopped: bool = False  # maxfail reached: the ids after it did not run
    seconds: float = 0.0
    output: str = ""

    def passed(self, tests: Iterable[str]) -> list[str]:
        return [t for t in tests if self.outcomes.get(t) == "passed"]

    def failed(self, tests: Iterable[str]) -> list[str]:
        return [t for t in tests if self.outcomes.get(t) in ("failed", "error")]

    def all_pass(self, tests: Iterable[str]) -> bool:
        return not self.timed_out and all(self.outcomes.get(t) == "passed" for t in tests)


_PLUGIN_DIR: Path | None = None


def plugin_dir() -> Path:
    """A folder holding the pytest plugin (written once per process)."""
    global _PLUGIN_DIR
    if _PLUGIN_DIR is None or not (_PLUGIN_DIR / f"{PLUGIN_NAME}.py").exists():
        folder = Path(tempfile.mkdtemp(prefix="turnstile-swe-plugin-"))
        (folder / f"{PLUGIN_NAME}.py").write_text(PLUGIN_SOURCE, encoding="utf-8")
        atexit.register(shutil.rmtree, folder, True)
        _PLUGIN_DIR = folder
    return _PLUGIN_DIR


def files_of(test_ids: Iterable[str]) -> list[str]:
    """The files of pytest test ids ("path::name[...]" -> "path"), sorted, each once."""
    return sorted({t.split("::", 1)[0] for t in test_ids})


def pytest_env(pythonpath: Iterable[str] = (), tree: Path | None = None) -> dict:
    """The environment tests run under: no plugin autoloading (faster, and no installed plugin
    changes outcomes), no bytecode files (a mutated source is always recompiled), a fixed hash
    seed, the tree's own folders (e.g. src) first on sys.path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "PYTHON", "COV_"))}
    paths = [str(plugin_dir())] + [str((tree / p) if tree else p) for p in pythonpath]
    env.update({"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0",
                "PYTHONPATH": os.pathsep.join(paths), "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"})
    return env


# How run_pytest starts pytest: (argv, cwd, timeout, env) -> something with returncode, stdout,
# stderr, timed_out and seconds (a Completed, or envs.swe.sandbox's RunResult).
Runner = Callable[[list[str], Path, float, dict], Any]


# python -c _LIMITED <MB> -m pytest ...: set RLIMIT_AS, then exec the rest (no preexec_fn needed).
_LIMITED = ("import os,resource,sys;m=int(sys.argv[1])<<20;resource.setrlimit(resource.RLIMIT_AS,(m,m));"
            "os.execv(sys.executable,[sys.executable,*sys.argv[2:]])")


def _local_runner(cmd: list[str], cwd: Path, timeout: float, env: dict) -> Completed:
    return run_command(cmd, cwd, timeout=timeout, env=env)


def run_pytest(tree: str | Path, tests: Iterable[str] | None = None, paths: Iterable[str] = (),
               timeout: float = 600, pythonpath: Iterable[str] = (), trace: str | None = None,
               scratch: str | Path | None = None, python: str = sys.executable,
               runner: Runner | None = None, memory_mb: int | None = 4096, maxfail: int | None = None) -> TestRun:
    """Run test ids (or, with tests=None, everything under `paths`) in tree with pytest.

    trace: a folder of tree (e.g. ".") whose code each test's run is recorded for (TestRun.covers:
    test id -> sorted (file relative to that folder, first line of each code object run)).
    runner: how the command is started (default: run_command, a plain subprocess in its own
    session, fine for the trusted code of synthesis; the env passes a sandboxed one for code a
    model wrote). The plugin folder and `scratch` must be readable and writable by it.
    memory_mb: the address-space limit of the test process (a bug that grows a list forever fails
    fast instead of filling the machine); None for none.
    Test ids run in the order given. maxfail: stop after that many failures (TestRun.stopped; the
    ids not run are "missing").
    """
    tree = Path(tree).resolve()
    wanted = None if tests is None else list(dict.fromkeys(tests))
    own_scratch = scratch is None
    scratch = Path(tempfile.mkdtemp(prefix="turnstile-swe-run-") if own_scratch else scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    scratch = scratch.resolve()  # pytest runs in the tree
    try:
        out = scratch / "results.json"
        out.unlink(missing_ok=True)
        limit = [] if memory_mb is None else ["-c", _LIMITED, str(memory_mb)]
        cmd = [python, *limit, "-m", "pytest", "-q", "-p", PLUGIN_NAME, "-p", "no:cacheprovider", "--tb=short",
               "--continue-on-collection-errors", "--rootdir", str(tree), "-o", "console_output_style=classic",
               f"--basetemp={scratch / 'tmp'}", f"--swe-out={out}"]
        if wanted is not None:
            if not wanted:
                return TestRun()
            select = scratch / "select.json"
            select.write_text(json.dumps(wanted), encoding="utf-8")
            cmd += [f"--swe-select={select}", *files_of(wanted)]
        else:
            cmd += list(paths)
        if trace is not None:
            cmd.append(f"--swe-trace={tree / trace}")
        if maxfail is not None:
            cmd.append(f"--maxfail={maxfail}")
        res = (runner or _local_runner)(cmd, tree, timeout, pytest_env(pythonpath, tree))
        run = TestRun(returncode=res.returncode, timed_out=res.timed_out, seconds=res.seconds,
                      output=(res.stdout + res.stderr)[-6000:])
        if out.exists():
            data = json.loads(out.read_text(encoding="utf-8"))
            for nodeid, t in data["tests"].items():
                run.outcomes[nodeid] = t["outcome"] or "error"
                run.durations[nodeid] = t["duration"]
                if "text" in t:
                    run.texts[nodeid] = t["text"]
                    run.messages[nodeid] = t.get("message", "")
                if "covers" in t:
                    run.covers[nodeid] = [tuple(c) for c in t["covers"]]
            run.collect_errors = data["collect_errors"]
        for t in wanted or ():
            run.outcomes.setdefault(t, "missing")
        run.stopped = maxfail is not None and len(run.failed(run.outcomes)) >= maxfail
        return run
    finally:
        if own_scratch:
            shutil.rmtree(scratch, ignore_errors=True)


@dataclass
class Validation:
    """validate_instance's verdict: ok, and why not."""

    instance_id: str
    ok: bool
    problems: list[str]
    before: TestRun | None = None
    after: TestRun | None = None
    seconds: float = 0.0


def instance_pythonpath(instance: dict) -> list[str]:
    """Folders of the tree to put on sys.path for its tests (synthesized instances record them)."""
    return list((instance.get("synth") or {}).get("pythonpath", []))


def validate_instance(instance: dict, repos_dir: str | Path, workdir: str | Path | None = None,
                      timeout: float = 600, pythonpath: Iterable[str] | None = None) -> Validation:
    """SWE-bench's validation, from scratch: check out base_commit, apply test_patch, run
    FAIL_TO_PASS + PASS_TO_PASS (each FAIL_TO_PASS must fail, each PASS_TO_PASS pass), apply
    `patch`, run them again (all must pass). The tests run in the current Python environment."""
    start = time.perf_counter()
    iid = instance["instance_id"]
    tests = list(instance["FAIL_TO_PASS"]) + list(instance["PASS_TO_PASS"])
    pypath = instance_pythonpath(instance) if pythonpath is None else list(pythonpath)
    own = workdir is None
    work = Path(tempfile.mkdtemp(prefix="turnstile-swe-validate-") if own else workdir)
    problems: list[str] = []
    before = after = None
    try:
        tree = checkout(instance, repos_dir, work / "tree")
        apply_patch(tree, instance.get("test_patch", ""), f"test_patch of {iid!r}")
        before = run_pytest(tree, tests, timeout=timeout, pythonpath=pypath, scratch=work / "run")
        if before.timed_out:
            problems.append("timed out before the fix")
        still = [t for t in instance["FAIL_TO_PASS"] if before.outcomes.get(t) not in ("failed", "error")]
        if still:
            problems.append(f"FAIL_TO_PASS not failing before the fix: {still[:5]}")
        broken = [t for t in instance["PASS_TO_PASS"] if before.outcomes.get(t) != "passed"]
        if broken:
            problems.append(f"PASS_TO_PASS not passing before the fix: {broken[:5]}")
        apply_patch(tree, instance["patch"], f"patch of {iid!r}")
        after = run_pytest(tree, tests, timeout=timeout, pythonpath=pypath, scratch=work / "run")
        if after.timed_out:
            problems.append("timed out after the fix")
        failing = [t for t in tests if after.outcomes.get(t) != "passed"]
        if failing:
            problems.append(f"not passing after the fix: {failing[:5]}")
    except InstanceError as e:
        problems.append(str(e))
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)
    return Validation(iid, not problems, problems, before, after, time.perf_counter() - start)


def validate_instances(instances: list[dict], repos_dir: str | Path, workers: int = 1, timeout: float = 600,
                       progress: bool = True) -> list[Validation]:
    """validate_instance over many instances on `workers` threads (each test run is a subprocess),
    in the instances' order."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    with ThreadPoolExecutor(max(1, workers)) as pool:
        futures = [pool.submit(validate_instance, inst, repos_dir, None, timeout) for inst in instances]
        return [f.result() for f in tqdm(futures, desc="validate", disable=not progress, unit="inst")]
