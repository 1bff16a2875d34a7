"""SWE instances (envs/swe/instances.py): the SWE-Gym / SWE-bench loader and its errors, local
repositories (clones, bare, bundles) and checkouts without history, the pytest runner (outcomes,
traced coverage, timeouts that kill the process group) and SWE-bench's validation."""

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from envs.swe.instances import (
    SWE_FIELDS,
    InstanceError,
    apply_patch,
    checkout,
    find_repo,
    git,
    load_instances,
    run_pytest,
    validate_instance,
    write_instances,
)

BUGGY = "def add(a, b):\n    return a - b\n\n\ndef mul(a, b):\n    return a * b\n"
FIXED = "def add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n    return a * b\n"
TESTS = ("from lib import add, mul\n\n\ndef test_add():\n    assert add(2, 3) == 5\n\n\n"
         "def test_mul():\n    assert mul(2, 3) == 6\n")
FIX = ("diff --git a/lib.py b/lib.py\n--- a/lib.py\n+++ b/lib.py\n@@ -1,5 +1,5 @@\n def add(a, b):\n"
       "-    return a - b\n+    return a + b\n \n \n def mul(a, b):\n")


def swe_gym_record(**changes) -> dict:
    rec = {
        "instance_id": "acme__lib-1", "repo": "acme/lib", "base_commit": "a" * 40,
        "problem_statement": "add() subtracts", "hints_text": "", "patch": FIX, "test_patch": "",
        "FAIL_TO_PASS": ["test_lib.py::test_add"], "PASS_TO_PASS": ["test_lib.py::test_mul"],
        "version": "1.0", "created_at": "2024-01-02T03:04:05Z",
    }
    rec.update(changes)
    return rec


def make_repo(root: Path) -> tuple[Path, str, str]:
    """acme/lib as a clone under root: a fixed commit, then the buggy commit on top."""
    repo = root / "acme__lib"
    repo.mkdir(parents=True)
    (repo / "lib.py").write_text(FIXED)
    (repo / "test_lib.py").write_text(TESTS)
    git(["init", "-q"], repo)
    git(["add", "-A"], repo)
    git(["commit", "-q", "-m", "good"], repo)
    good = git(["rev-parse", "HEAD"], repo).strip()
    (repo / "lib.py").write_text(BUGGY)
    git(["commit", "-q", "-am", "bug"], repo)
    return repo, good, git(["rev-parse", "HEAD"], repo).strip()


def test_loader_reads_a_swe_gym_file_and_a_swe_bench_file(tmp_path):
    gym = tmp_path / "gym.jsonl"
    recs = [swe_gym_record(), swe_gym_record(instance_id="acme__lib-2", extra_field={"kept": True})]
    gym.write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    got = load_instances(gym)
    assert [g["instance_id"] for g in got] == ["acme__lib-1", "acme__lib-2"]
    assert all(set(SWE_FIELDS) <= set(g) for g in got)
    assert got[0]["FAIL_TO_PASS"] == ["test_lib.py::test_add"] and got[1]["extra_field"] == {"kept": True}

    # SWE-bench: a JSON list, the test lists as JSON text, a numeric version, hints null
    bench = tmp_path / "bench.json"
    rec = swe_gym_record(FAIL_TO_PASS=json.dumps(["t.py::a"]), PASS_TO_PASS="[]", version=3.0, hints_text=None)
    bench.write_text(json.dumps([rec]))
    (one,) = load_instances(bench)
    assert one["FAIL_TO_PASS"] == ["t.py::a"] and one["PASS_TO_PASS"] == [] and one["version"] == "3.0"
    assert one["hints_text"] == ""

    # round trip through write_instances, SWE-Gym's keys first
    out = write_instances(got, tmp_path / "again.jsonl")
    assert load_instances(out) == got
    assert list(json.loads(out.read_text().splitlines()[0]))[: len(SWE_FIELDS)] == list(SWE_FIELDS)


@pytest.mark.parametrize("change, field", [
    ({"patch": ""}, "patch"),
    ({"patch": "just words"}, "patch"),
    ({"FAIL_TO_PASS": []}, "FAIL_TO_PASS"),
    ({"FAIL_TO_PASS": "not json"}, "FAIL_TO_PASS"),
    ({"PASS_TO_PASS": [1]}, "PASS_TO_PASS"),
    ({"base_commit": "main"}, "base_commit"),
    ({"repo": "no-owner"}, "repo"),
    ({"problem_statement": None}, "problem_statement"),
])
def test_a_malformed_instance_is_named_with_its_field(tmp_path, change, field):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(swe_gym_record()) + "\n" + json.dumps(swe_gym_record(instance_id="bad-2", **change)))
    with pytest.raises(InstanceError) as e:
        load_instances(path)
    msg = str(e.value)
    assert f"{path}:2" in msg and "'bad-2'" in msg and repr(field) in msg, msg


def test_loader_errors_for_missing_fields_duplicates_and_bad_lines(tmp_path):
    path = tmp_path / "x.json"
    rec = swe_gym_record()
    del rec["patch"]
    path.write_text(json.dumps([swe_gym_record(instance_id="ok"), rec]))
    with pytest.raises(InstanceError, match=r"x\.json\[1\]: instance 'acme__lib-1', field 'patch': Field required"):
        load_instances(path)
    path.write_text(json.dumps([swe_gym_record(), swe_gym_record()]))
    with pytest.raises(InstanceError, match=r"\[1\]: instance 'acme__lib-1', field 'instance_id': duplicate"):
        load_instances(path)
    rec = swe_gym_record()
    del rec["instance_id"]
    path.write_text(json.dumps([rec]))
    with pytest.raises(InstanceError, match=r"instance \(no instance_id\), field 'instance_id'"):
        load_instances(path)
    lines = tmp_path / "x.jsonl"
    lines.write_text(json.dumps(swe_gym_record()) + "\n{oops\n")
    with pytest.raises(InstanceError, match=r"x\.jsonl:2: not JSON"):
        load_instances(lines)


def test_repositories_as_clones_bare_repos_and_bundles(tmp_path):
    repos = tmp_path / "repos"
    repo, good, bad = make_repo(repos)
    inst = swe_gym_record(base_commit=bad)
    assert find_repo("acme/lib", repos) == repo
    assert load_instances(_file(tmp_path, inst), repos_dir=repos, check_commits=True)[0]["base_commit"] == bad
    with pytest.raises(InstanceError, match="field 'repo': repository 'acme/other' not found"):
        load_instances(_file(tmp_path, swe_gym_record(repo="acme/other")), repos_dir=repos)
    with pytest.raises(InstanceError, match="field 'base_commit'"):
        load_instances(_file(tmp_path, swe_gym_record(base_commit="b" * 40)), repos_dir=repos, check_commits=True)

    # no history by default: one commit, the fixed one unreachable
    tree = checkout(inst, repos, tmp_path / "t1")
    assert (tree / "lib.py").read_text() == BUGGY
    assert git(["log", "--all", "--format=%s"], tree).split() == ["base"]
    assert git(["status", "--porcelain"], tree) == ""
    assert checkout(inst, repos, tmp_path / "t1b").joinpath(".git").exists()
    assert git(["rev-parse", "HEAD"], tree) == git(["rev-parse", "HEAD"], tmp_path / "t1b")  # deterministic
    full = checkout(inst, repos, tmp_path / "t2", history=True)
    assert git(["rev-parse", "HEAD"], full).strip() == bad and (full / "lib.py").read_text() == BUGGY

    # a bare clone and a bundle stand in for the clone
    other = tmp_path / "other"
    other.mkdir()
    git(["clone", "-q", "--bare", str(repo), str(other / "acme__lib.git")], other)
    assert find_repo("acme/lib", other) == other / "acme__lib.git"
    assert (checkout(inst, other, tmp_path / "t3") / "lib.py").read_text() == BUGGY
    bundles = tmp_path / "bundles"
    (bundles / "acme").mkdir(parents=True)
    git(["bundle", "create", str(bundles / "acme" / "lib.bundle"), "--all"], repo)
    assert find_repo("acme/lib", bundles) == bundles / "acme" / "lib.bundle"
    assert (checkout(inst, bundles, tmp_path / "t4") / "lib.py").read_text() == BUGGY
    with pytest.raises(InstanceError, match="field 'base_commit'"):
        checkout(swe_gym_record(base_commit="c" * 40), bundles, tmp_path / "t5")

    apply_patch(tree, FIX)
    assert (tree / "lib.py").read_text() == FIXED
    with pytest.raises(InstanceError, match="does not apply"):
        apply_patch(tree, FIX)


def _file(tmp_path: Path, *records) -> Path:
    path = tmp_path / f"i{time.perf_counter_ns()}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_run_pytest_reports_outcomes_failures_and_covered_code(tmp_path):
    (tmp_path / "lib.py").write_text(BUGGY)
    (tmp_path / "test_x.py").write_text(
        "import pytest\nfrom lib import add, mul\n\n\ndef test_add():\n    assert add(2, 3) == 5\n\n\n"
        "def test_mul():\n    assert mul(2, 3) == 6\n\n\n"
        "@pytest.fixture\ndef broken():\n    raise RuntimeError('x')\n\n\n"
        "def test_error(broken):\n    pass\n\n\ndef test_skip():\n    pytest.skip('no')\n\n\n"
        "@pytest.mark.parametrize('n', [1, 2])\ndef test_param(n):\n    assert n\n")
    run = run_pytest(tmp_path, None, paths=["test_x.py"], trace=".")
    assert run.outcomes == {"test_x.py::test_add": "failed", "test_x.py::test_mul": "passed",
                            "test_x.py::test_error": "error", "test_x.py::test_skip": "skipped",
                            "test_x.py::test_param[1]": "passed", "test_x.py::test_param[2]": "passed"}
    assert "assert -1 == 5" in run.texts["test_x.py::test_add"]
    assert ("lib.py", 1) in run.covers["test_x.py::test_add"] and ("lib.py", 1) not in run.covers["test_x.py::test_mul"]
    assert ("lib.py", 5) in run.covers["test_x.py::test_mul"]

    chosen = run_pytest(tmp_path, ["test_x.py::test_mul", "test_x.py::test_param[2]", "test_x.py::gone"])
    assert chosen.outcomes == {"test_x.py::test_mul": "passed", "test_x.py::test_param[2]": "passed",
                               "test_x.py::gone": "missing"}
    assert not chosen.covers
    # ids run in the order given; maxfail stops the run
    first = run_pytest(tmp_path, ["test_x.py::test_param[2]", "test_x.py::test_add", "test_x.py::test_mul"], maxfail=1)
    assert first.stopped and first.outcomes == {"test_x.py::test_param[2]": "passed", "test_x.py::test_add": "failed",
                                                "test_x.py::test_mul": "missing"}


def test_run_pytest_timeout_kills_the_process_group(tmp_path):
    pid_file = tmp_path / "child.pid"
    (tmp_path / "test_slow.py").write_text(
        "import subprocess, time\n\n\ndef test_slow():\n"
        f"    p = subprocess.Popen(['sleep', '60'])\n    open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
        "    time.sleep(60)\n")
    start = time.perf_counter()
    run = run_pytest(tmp_path, ["test_slow.py::test_slow"], timeout=4)
    assert run.timed_out and time.perf_counter() - start < 30
    assert run.outcomes == {"test_slow.py::test_slow": "missing"}
    child = int(pid_file.read_text())
    for _ in range(50):  # the killed child is reaped by init shortly after
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        if Path(f"/proc/{child}/stat").exists() and Path(f"/proc/{child}/stat").read_text().split()[2] == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail("the test's child process outlived the timeout")


def test_validate_instance_is_swe_bench_validation(tmp_path):
    repos = tmp_path / "repos"
    _, good, bad = make_repo(repos)
    inst = load_instances(_file(tmp_path, swe_gym_record(base_commit=bad)))[0]
    v = validate_instance(inst, repos)
    assert v.ok, v.problems
    assert v.before.outcomes == {"test_lib.py::test_add": "failed", "test_lib.py::test_mul": "passed"}
    assert v.after.all_pass(["test_lib.py::test_add", "test_lib.py::test_mul"])

    # on the fixed commit FAIL_TO_PASS does not fail, and the patch no longer applies
    v = validate_instance(dict(inst, base_commit=good), repos)
    assert not v.ok and "FAIL_TO_PASS not failing" in v.problems[0] and "does not apply" in v.problems[-1]
    v = validate_instance(dict(inst, PASS_TO_PASS=["test_lib.py::test_add"]), repos)
    assert not v.ok and any("PASS_TO_PASS not passing" in p for p in v.problems)
    # a test_patch is applied before the tests run
    test_patch = ("diff --git a/test_lib.py b/test_lib.py\n--- a/test_lib.py\n+++ b/test_lib.py\n"
                  "@@ -9,1 +9,5 @@ def test_mul():\n     assert mul(2, 3) == 6\n+\n+\n+def test_add_more():\n"
                  "+    assert add(1, 1) == 2\n")
    v = validate_instance(dict(inst, test_patch=test_patch, FAIL_TO_PASS=["test_lib.py::test_add_more"]), repos)
    assert v.ok, v.problems
    assert subprocess.run(["git", "--version"], capture_output=True).returncode == 0
