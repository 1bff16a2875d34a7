"""Instance synthesis (envs/swe/synth.py, mutations.py, projects.py) on a tiny local project the
test writes: deterministic per seed whatever the workers, every kept instance validates from
scratch (SWE-bench's check), the fix is a small git patch, splits are disjoint by function, the
cache is reused, and the pinned sdists' hashes are checked (no download here)."""

import ast
import json
import random
import re
from pathlib import Path

import pytest

from envs.swe import mutations
from envs.swe.instances import apply_patch, checkout, git, load_instances, validate_instances
from envs.swe.projects import (
    PINNED,
    HashMismatchError,
    MissingDataError,
    Project,
    local_project,
    resolve_projects,
    sha256_of,
)
from envs.swe.synth import (
    SPLITS,
    SyntheticSource,
    SynthSettings,
    _order,
    make_patch,
    open_synthetic,
    split_of,
    synthesize,
)

CORE = '''"""A tiny library for the synthesis tests."""


def clamp(x, lo, hi):
    """x limited to [lo, hi]."""
    if x < lo:
        return lo
    if x > hi:  # the upper bound
        return hi
    return x


def mean(xs):
    if not xs:
        raise ValueError("empty")
    return sum(xs) / len(xs)


def window(xs, n):
    return [xs[i:i + n] for i in range(len(xs) - n + 1)]


def unused(a, b):
    return a - b


class Stack:
    def __init__(self):
        self.items = []

    def push(self, x):
        self.items.append(x)
        return len(self.items)

    def pop(self):
        if not self.items:
            raise IndexError("pop from an empty stack")
        return self.items.pop()
'''

TESTS = '''import pytest

from calc import Stack, clamp, mean, window


def test_clamp_inside():
    assert clamp(5, 0, 10) == 5


def test_clamp_low():
    assert clamp(-3, 0, 10) == 0


def test_clamp_high():
    assert clamp(12, 0, 10) == 10


def test_clamp_edges():
    assert clamp(0, 0, 10) == 0
    assert clamp(10, 0, 10) == 10


def test_mean():
    assert mean([1, 2, 3, 6]) == 3


def test_mean_empty():
    with pytest.raises(ValueError):
        mean([])


@pytest.mark.parametrize("n", [1, 2, 3])
def test_window(n):
    xs = [1, 2, 3, 4]
    got = window(xs, n)
    assert len(got) == len(xs) - n + 1
    assert all(len(w) == n for w in got)
    assert got[0] == xs[:n]


def test_stack():
    s = Stack()
    assert s.push(1) == 1
    assert s.push(2) == 2
    assert s.pop() == 2
    assert s.pop() == 1
    with pytest.raises(IndexError):
        s.pop()
'''

SETTINGS = dict(seed=0, max_per_function=1, max_candidates=3)


def write_project(root: Path) -> Project:
    (root / "src" / "calc").mkdir(parents=True)
    (root / "tests").mkdir()
    (root / "src" / "calc" / "__init__.py").write_text("from .core import Stack, clamp, mean, window  # noqa\n")
    (root / "src" / "calc" / "core.py").write_text(CORE)
    (root / "tests" / "test_core.py").write_text(TESTS)
    return local_project("calc", root, source=("src/calc",), tests=("tests",), version="1.0", pythonpath=("src",))


@pytest.fixture(scope="module")
def synthesized(tmp_path_factory):
    root = tmp_path_factory.mktemp("swe_synth")
    project = write_project(root / "calc")
    one = synthesize([project], root / "out1", workers=2, progress=False, **SETTINGS)
    two = synthesize([project], root / "out2", workers=1, progress=False, **SETTINGS)
    return project, one, two


def test_synthesis_is_deterministic_per_seed_whatever_the_workers(synthesized):
    _, one, two = synthesized
    assert one.instances, one.stats
    assert one.instances == two.instances  # ids, commits, statements, patches, splits: all equal
    assert one.folder.name == two.folder.name
    kinds = {i["synth"]["kind"] for i in one.instances}
    assert len(kinds) >= 3, kinds
    functions = {i["synth"]["function"] for i in one.instances}
    assert "unused" not in functions  # no test runs it
    assert {"clamp", "mean", "Stack.pop"} <= functions, functions
    assert all(len([i for i in one.instances if i["synth"]["function"] == f]) == 1 for f in functions)
    stats = one.stats["projects"]["calc"]
    assert stats["baseline"]["stable"] == 10 and stats["instances"] == len(one.instances)
    assert stats["attempts"] >= stats["instances"] and one.stats["validation_attempts_per_s"] > 0
    # the instances file is SWE-Gym's format, read back by the loader
    assert load_instances(one.folder / "instances.jsonl") == one.instances


def test_every_kept_instance_validates_from_scratch(synthesized):
    _, one, _ = synthesized
    verdicts = validate_instances(one.instances, one.repos_dir, workers=2, progress=False)
    assert all(v.ok for v in verdicts), [(v.instance_id, v.problems) for v in verdicts if not v.ok]
    for inst in one.instances:
        assert inst["FAIL_TO_PASS"] and not set(inst["FAIL_TO_PASS"]) & set(inst["PASS_TO_PASS"])
        assert inst["test_patch"] == "" and inst["hints_text"] == ""


def test_the_fix_is_a_small_git_patch_that_gives_back_the_base(synthesized, tmp_path):
    _, one, _ = synthesized
    for k, inst in enumerate(one.instances):
        meta = inst["synth"]
        tree = checkout(inst, one.repos_dir, tmp_path / f"t{k}")
        assert git(["log", "--all", "--format=%s"], tree).split() == ["base"]  # nothing about the fix
        clean = git(["show", f"{meta['clean_commit']}:{meta['file']}"], one.repos_dir / "pypi__calc")
        buggy = (tree / meta["file"]).read_text()
        assert buggy != clean
        # only the function's lines differ
        b_lines, c_lines = buggy.splitlines(), clean.splitlines()
        unit = [u for u in mutations.units(clean, meta["file"], meta["module"]) if u.qualname == meta["function"]][0]
        assert b_lines[: unit.start - 1] == c_lines[: unit.start - 1]
        tail = len(c_lines) - unit.end
        assert b_lines[len(b_lines) - tail:] == c_lines[len(c_lines) - tail:]
        assert inst["patch"].startswith(f"diff --git a/{meta['file']} b/{meta['file']}\n--- a/")
        assert inst["patch"].count("\n@@ ") == 1
        apply_patch(tree, inst["patch"])
        assert (tree / meta["file"]).read_text() == clean
        assert git(["status", "--porcelain"], tree).strip() == f"M {meta['file']}"
        # every other file of the buggy commit is the clean commit's
        changed = git(["diff", "--name-only", meta["clean_commit"], inst["base_commit"]], one.repos_dir / "pypi__calc")
        assert changed.split() == [meta["file"]]


def test_problem_statements_come_from_the_failing_tests(synthesized):
    project, one, _ = synthesized
    for inst in one.instances:
        text = inst["problem_statement"]
        assert all(t in text for t in inst["FAIL_TO_PASS"][:10])
        assert "E   " in text or "Error" in text  # the assertion / exception
        assert str(project.path) not in text and "/tmp" not in text and "diff --git" not in text
        assert inst["synth"]["mutation"] not in text


def test_splits_are_disjoint_by_function(synthesized):
    _, one, _ = synthesized
    source = SyntheticSource(one.folder)
    assert source.splits() == list(SPLITS)
    seen = {}
    for split in source.splits():
        for task in source.tasks(split):
            key = (task["synth"]["project"], task["synth"]["module"], task["synth"]["function"])
            assert seen.setdefault(key, split) == split, key
    assert sum(len(source.tasks(s)) for s in SPLITS) == len(one.instances)
    # the rule itself: by function, stable, and all three splits in use over many functions
    names = [("p", f"m{i % 7}", f"f{i}") for i in range(3000)]
    got = [split_of(*n) for n in names]
    assert got == [split_of(*n) for n in names]
    share = {s: got.count(s) / len(got) for s in SPLITS}
    assert 0.75 < share["train"] < 0.85 and 0.07 < share["valid"] < 0.13 and 0.07 < share["heldout"] < 0.13


def test_results_are_cached_by_settings(synthesized, monkeypatch):
    project, one, _ = synthesized
    import envs.swe.synth as synth

    monkeypatch.setattr(synth, "run_pytest", lambda *a, **k: pytest.fail("the cache was not reused"))
    again = synthesize([project], one.folder.parent, workers=2, progress=False, **SETTINGS)
    assert again.folder == one.folder and again.instances == one.instances
    source = open_synthetic(one.folder.parent, [project], SynthSettings(**SETTINGS))
    assert len(source.tasks("train")) == sum(i["split"] == "train" for i in one.instances)
    with pytest.raises(MissingDataError, match="launch.py gen-data"):
        open_synthetic(one.folder.parent, [project], SynthSettings(**{**SETTINGS, "seed": 1}))


def test_mutation_sites_cover_every_kind_and_keep_the_file_outside_the_function():
    source = CORE + '''

def more(xs, k, flag=True):
    total = 0
    for i in range(1, len(xs)):
        if xs[i] >= k and flag:
            total += xs[i] - xs[i - 1]
        elif xs[i] in (None, 0) or not flag:
            break
    return total > 2 if flag else xs[-1:] == xs[:2]
'''
    units = mutations.units(source, "calc/core.py", "calc.core")
    assert [u.qualname for u in units] == ["clamp", "mean", "window", "unused", "Stack.__init__", "Stack.push",
                                           "Stack.pop", "more"]
    kinds = set()
    lines = source.splitlines(keepends=True)
    for unit in units:
        for site in mutations.sites(source, unit):
            mut = mutations.materialize(source, unit, site)
            assert mut is not None, (unit.qualname, site)
            kinds.add(site.kind)
            new = mut.text.splitlines(keepends=True)
            assert new[: unit.start - 1] == lines[: unit.start - 1]
            tail = len(lines) - unit.end
            assert new[len(new) - tail:] == lines[len(lines) - tail:]
            ast.parse(mut.text)
            assert unit.start <= mut.line <= unit.end
            assert '"""x limited to [lo, hi]."""' in mut.text  # docstrings untouched
    assert kinds == set(mutations.KINDS)

    def hunks(unit):  # kind -> [(buggy lines, clean lines)] of the fix's one hunk
        out = {}
        for site in mutations.sites(source, unit):
            patch = make_patch("core.py", mutations.materialize(source, unit, site).text, source, context=0)
            body = [ln for ln in patch.splitlines()[3:] if not ln.startswith("@@")]
            out.setdefault(site.kind, []).append(([ln[1:] for ln in body if ln[0] == "-"],
                                                  [ln[1:] for ln in body if ln[0] == "+"]))
        return out

    clamp, more = hunks(units[0]), hunks(units[-1])
    assert (["    if x >= lo:"], ["    if x < lo:"]) in clamp["flip_comparison"]
    assert (["    if x >= hi:  # the upper bound"], ["    if x > hi:  # the upper bound"]) in \
        clamp["weaken_comparison"]  # the comment is kept
    assert (["    if lo < x:"], ["    if x < lo:"]) in clamp["swap_operands"]
    assert (["    return None"], ["    return x"]) in clamp["wrong_return"]
    assert ([], ["    if x > hi:  # the upper bound", "        return hi"]) in clamp["drop_statement"]
    assert (["    return lo"], ["    if x < lo:", "        return lo"]) in clamp["drop_condition"]
    assert (["            pass"], ["            break"]) in more["drop_statement"]  # a block never empties
    assert (["    for i in range(1, len(xs) - 1):"], ["    for i in range(1, len(xs)):"]) in more["off_by_one"]
    assert (["        if xs[i] >= k:"], ["        if xs[i] >= k and flag:"]) in more["drop_condition"]
    assert (["        if xs[i] >= k or flag:"], ["        if xs[i] >= k and flag:"]) in more["flip_comparison"]
    assert (["            total += xs[i] - xs[i - 2]"], ["            total += xs[i] - xs[i - 1]"]) in \
        more["wrong_constant"]


def test_the_order_of_mutations_is_seeded():
    sites = [mutations.Site(k, i, "v") for i in range(20) for k in mutations.KINDS]
    a = _order(sites, random.Random("0/p/u"))
    assert a == _order(sites, random.Random("0/p/u")) != _order(sites, random.Random("1/p/u"))
    assert sorted(a, key=lambda s: (s.kind, s.index)) == sorted(sites, key=lambda s: (s.kind, s.index))
    assert len({s.kind for s in a[: len(mutations.KINDS)]}) == len(mutations.KINDS)  # round the kinds first


def test_pinned_sdists_are_hash_checked_and_never_fetched_by_synthesis(tmp_path):
    assert len(PINNED) >= 3 and len({p.name for p in PINNED}) == len(PINNED)
    assert all(re.fullmatch(r"[0-9a-f]{64}", p.sha256) and p.sdist.endswith(".tar.gz") for p in PINNED)
    project = Project("tiny", "1.0", ("tiny",), ("tests",), sha256=sha256_of_bytes(b"the real sdist"),
                      sdist="tiny-1.0.tar.gz")
    with pytest.raises(MissingDataError, match="launch.py gen-data"):
        resolve_projects(tmp_path, [project])
    (tmp_path / "sdists").mkdir()
    target = tmp_path / "sdists" / "tiny-1.0.tar.gz"
    target.write_bytes(b"the real sdist")
    assert resolve_projects(tmp_path, [project])[0].path == str(target)
    target.write_bytes(b"the real sdist, tampered")
    with pytest.raises(HashMismatchError, match="is not the pinned"):
        resolve_projects(tmp_path, [project])
    with pytest.raises(MissingDataError, match="resolve_projects"):
        synthesize([project], tmp_path / "out", progress=False)
    with pytest.raises(MissingDataError, match="launch.py gen-data"):
        open_synthetic(tmp_path, list(PINNED))


def sha256_of_bytes(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_sha256_of_reads_the_file(tmp_path):
    (tmp_path / "f").write_bytes(b"abc")
    assert sha256_of(tmp_path / "f") == sha256_of_bytes(b"abc")
    assert json.dumps(SynthSettings().model_dump(mode="json"))  # the settings are JSON (the cache key)


def test_problem_statement_text_is_cleaned():
    import sys

    from envs.swe.instances import TestRun
    from envs.swe.synth import PYTHON_ROOTS, _internal, problem_statement

    run = TestRun(texts={"t.py::a": f"{sys.base_prefix}/lib/x.py:3: in f\n/work/slot0/pkg/m.py:9: in g\n"
                                    "E   assert <object at 0x7f00deadbeef> == 1"})
    project = Project("pkg", "1.0", ("pkg",), ("t.py",))
    text = problem_statement(project, ["t.py::a", "t.py::b"], run, [("/work/slot0", ""), *PYTHON_ROOTS])
    assert "<python>/lib/x.py:3" in text and "\npkg/m.py:9: in g" in text and "0x..." in text
    assert "/work/slot0" not in text and "    t.py::b" in text
    assert _internal("/x/site-packages/_pytest/runner.py:1: in call") and not _internal("pkg/m.py:9: in g")
