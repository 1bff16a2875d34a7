"""envs/swe/sandbox.py: worktrees, limits, and every attack of issue 15's acceptance list blocked
(a write outside the worktree by absolute path, `..` and symlink, a network connection, a fork
bomb, memory runaway, an infinite loop, gigabytes of output, reading the parent's environment,
killing the parent). Where one layer alone should stop an attack, the test also runs with only
that layer (`_run_local(..., layers=...)`), so that a layer that silently stops working fails a
test even while the others still cover for it. Limits are small and everything is in temp dirs."""

import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from envs.swe import sandbox
from envs.swe.sandbox import (
    Container,
    RunResult,
    SandboxConfig,
    SandboxError,
    Worktree,
    docker_exec_argv,
    docker_missing,
    docker_run_argv,
    isolation_report,
    run,
    safe_path,
)

PY = sys.executable
CFG = SandboxConfig(timeout_s=10, cpu_s=5, memory_mb=1024, max_procs=32, file_mb=8, output_chars=4000, max_output_mb=4)
PROBE = sandbox._probe()

# Layer sets: everything this machine has, and each confinement layer on its own.
ALL = sandbox._layers(PROBE, CFG)
NONE = dict.fromkeys(ALL, False)
ONLY = {
    "all": ALL,
    "uid": {**NONE, "uid": True},
    "mountns": {**NONE, "mountns": True, "pidns": True},  # a private /proc needs the pid namespace too
    "pidns": {**NONE, "pidns": True, "mountns": True},
    "landlock": {**NONE, "landlock": True},
    "landlock_tcp": {**NONE, "landlock": True, "landlock_tcp": True},
    "netns": {**NONE, "netns": True},
    "no_landlock": {**ALL, "landlock": False, "landlock_tcp": False},
}


def needs(*layers: str):
    """Skip unless this machine has all of `layers`."""
    have = {**ALL, "landlock_signal": PROBE["landlock_abi"] >= 6, "landlock_tcp": PROBE["landlock_abi"] >= 4}
    missing = [name for name in layers if not have[name]]
    return pytest.mark.skipif(bool(missing), reason=f"this machine lacks {missing}")


def sbx(wt: Worktree, cmd, cfg: SandboxConfig = CFG, only: str | None = None, stdin=None, cwd=None) -> RunResult:
    """Run in `wt` with all layers, or with the single layer set `only`."""
    where = Path(cwd) if cwd is not None else wt.path
    layers = ONLY[only] if only is not None else None
    return sandbox._run_local(cmd, where, cfg, stdin, root=wt.path, readonly=wt.readonly, layers=layers)


def git(*args, cwd):
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t"}
    env["GIT_COMMITTER_EMAIL"] = "t@t"
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path):
    """A tiny repository: `base` has the bug, the commit after it (`fix`) fixes it."""
    r = tmp_path / "src"
    r.mkdir()
    git("init", "-q", "-b", "main", cwd=r)
    (r / "calc.py").write_text("def add(a, b):\n    return a - b\n")
    (r / "test_calc.py").write_text("from calc import add\n\ndef test_add():\n    assert add(2, 2) == 4\n")
    (r / ".gitignore").write_text("*.log\n")
    git("add", "-A", cwd=r)
    git("commit", "-qm", "base", cwd=r)
    base = git("rev-parse", "HEAD", cwd=r)
    (r / "calc.py").write_text("def add(a, b):\n    return a + b\n")
    git("commit", "-qam", "fix", cwd=r)
    return r, base, git("rev-parse", "HEAD", cwd=r)


@pytest.fixture
def wt(repo):
    r, base, _ = repo
    w = Worktree.create(r, base)
    yield w
    w.remove()


@pytest.fixture
def outside(tmp_path):
    """Targets outside the worktree that permissions alone would not protect: a 0666 file and a
    0777 dir (under /tmp), a 0777 dir on disk (/var/tmp), and a path in /etc (root's)."""
    d = tmp_path / "outside"
    d.mkdir()
    d.chmod(0o777)
    victim = d / "victim.txt"
    victim.write_text("original\n")
    victim.chmod(0o666)
    var = Path("/var/tmp") / f"turnstile-sandbox-test-{uuid.uuid4().hex[:8]}"
    var.mkdir()
    var.chmod(0o777)
    etc = Path("/etc") / f"turnstile-sandbox-test-{uuid.uuid4().hex[:8]}"
    yield {"dir": d, "victim": victim, "var": var, "etc": etc}
    for p in (var / "f", etc):
        p.unlink(missing_ok=True)
    var.rmdir()


def untouched(outside) -> bool:
    return (
        outside["victim"].read_text() == "original\n"
        and sorted(p.name for p in outside["dir"].iterdir()) == ["victim.txt"]
        and not (outside["var"] / "f").exists()
        and not outside["etc"].exists()
    )


def processes_of(uid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid == uid:
                    out.append(int(name))
            except FileNotFoundError:
                pass
    return out


def wait_gone(uid: int, seconds: float = 3.0) -> list[int]:
    end = time.monotonic() + seconds
    while (left := processes_of(uid)) and time.monotonic() < end:
        time.sleep(0.05)
    return left


# --------------------------------------------------------------------------------------------
# Config, report, refusal


def test_config_is_strict():
    with pytest.raises(ValueError):
        SandboxConfig(timeout=3)
    with pytest.raises(ValueError):
        SandboxConfig(memory_mb=0)
    with pytest.raises(ValueError):
        SandboxConfig(sandbox="chroot")
    assert SandboxConfig().sandbox == "local" and SandboxConfig().network is False


def test_isolation_report_says_what_is_in_force():
    rep = isolation_report()
    assert rep["sandbox"] == "local" and rep["timeout"] and rep["allowed"]
    assert set(rep["rlimits"]) == {"CPU", "AS", "NPROC", "FSIZE", "NOFILE", "CORE"}
    for key in ("uid", "pidns", "netns", "mountns", "landlock", "write_confinement", "network", "processes"):
        assert key in rep
    if os.geteuid() == 0:  # the training machines: root in a container that allows namespaces
        assert rep["uid"] and rep["pidns"] and rep["netns"] and rep["mountns"]
        assert rep["network"] == "netns" and rep["processes"] == "pid namespace"
        assert rep["write_confinement"][:2] == ["uid", "mount-readonly"]
    assert isolation_report(SandboxConfig(network=True))["network"] == "allowed"


def test_refuses_without_rlimits(monkeypatch, wt):
    monkeypatch.setattr(sandbox, "_PROBE", {**PROBE, "rlimits": False})
    assert isolation_report()["allowed"] is False
    with pytest.raises(SandboxError, match="rlimits"):
        wt.run("true", CFG)


def test_refuses_when_a_required_layer_is_missing(monkeypatch, wt):
    monkeypatch.setattr(sandbox, "_PROBE", {**PROBE, "netns": False, "landlock_abi": 0})
    assert isolation_report(CFG.model_copy(update={"require": ["netns"]}))["allowed"] is False
    with pytest.raises(SandboxError, match="netns"):
        wt.run("true", CFG.model_copy(update={"require": ["netns"]}))
    assert isolation_report()["network"] == "NOT CUT"  # and said so


def test_refuses_a_root_owned_writable_root(tmp_path):
    if not ALL["uid"]:
        pytest.skip("no uid switch here")
    d = tmp_path / "mine"
    d.mkdir()
    with pytest.raises(SandboxError, match="give_to_sandbox"):
        run("true", d, CFG)
    sandbox.give_to_sandbox(d)
    assert run("touch ok", d, CFG).ok and (d / "ok").exists()


# --------------------------------------------------------------------------------------------
# Running commands


def test_run_basics(wt):
    r = wt.run("echo hello; echo oops >&2; exit 3", CFG)
    assert (r.returncode, r.stdout, r.stderr, r.timed_out, r.killed_by_limit) == (3, "hello\n", "oops\n", False, None)
    assert wt.run([PY, "-c", "import sys; print(sys.stdin.read().upper())"], CFG, stdin="abc").stdout == "ABC\n"
    (wt.path / "sub").mkdir()
    os.lchown(wt.path / "sub", wt.uid, wt.uid)
    assert wt.run("pwd", CFG, cwd="sub").stdout.strip() == str(wt.path / "sub")
    missing = wt.run(["no-such-command-xyz"], CFG)
    assert missing.returncode == 127 and "no-such-command-xyz" in missing.stderr
    # /dev/stdout and friends can be reopened; the interpreter (under the hidden HOME) runs
    r = wt.run("echo a > /dev/stdout; echo b > /dev/stderr; echo c > /dev/null; cat /dev/stdin", CFG, stdin="d\n")
    assert (r.returncode, r.stdout, r.stderr) == (0, "a\nd\n", "b\n")
    assert wt.run([PY, "-c", "from calc import add; assert add(2, 2) == 4"], CFG).returncode == 1  # the bug
    assert r.seconds > 0


def test_output_is_cut_head_and_tail(wt):
    cfg = CFG.model_copy(update={"output_chars": 100})
    r = wt.run([PY, "-c", "print('A' * 5000 + 'Z' * 5000)"], cfg)
    assert r.truncated and r.stdout.startswith("A" * 50) and r.stdout.rstrip().endswith("Z" * 49)
    assert "truncated" in r.stdout and len(r.stdout) < 200
    cap = sandbox._Capture(keep=8)
    for _ in range(100):
        cap.feed(b"0123456789")
    text, cut = cap.text(8)
    assert cut and text.startswith("0123") and text.endswith("6789") and "1000 bytes" in text
    assert len(cap.head) + len(cap.tail) <= 3 * 8  # bounded memory


def test_extra_readonly_and_writable_dirs(wt, tmp_path):
    """How a test runner's plugin dir and result file get in and out (both under the hidden /tmp)."""
    plugin, results, other = tmp_path / "plugin", tmp_path / "results", tmp_path / "other"
    for d in (plugin, results, other):
        d.mkdir()
    (plugin / "p.py").write_text("X = 1\n")
    with pytest.raises(SandboxError, match="give_to_sandbox"):
        wt.run("true", CFG, writable=[results])
    assert sandbox.give_to_sandbox(results, uid=wt.uid) == wt.uid
    cmd = f"cat {plugin}/p.py > {results}/out.txt; echo no > {plugin}/p.py; echo no > {other}/x"
    r = wt.run(cmd, CFG, readonly=[plugin], writable=[results])
    assert (results / "out.txt").read_text() == "X = 1\n"
    assert (plugin / "p.py").read_text() == "X = 1\n" and not (other / "x").exists()
    assert r.returncode != 0


# --------------------------------------------------------------------------------------------
# Worktrees


def test_copy_worktree_has_base_only(repo):
    r, base, fix = repo
    with Worktree.create(r, base) as w:
        assert "a - b" in (w.path / "calc.py").read_text()
        log = w.run("git log --oneline --all", CFG)
        assert log.ok and len(log.stdout.splitlines()) == 1, log  # no fix (and no parent) to read
        assert w.run(f"git cat-file -e {fix}", CFG).returncode != 0
        # the model may use git as it likes; diff() still compares with the original base
        edit = "sed -i 's/a - b/a + b/' calc.py && echo new > added.py && echo x > run.log && git commit -qam wip"
        assert w.run(edit, CFG).ok
        patch = w.diff()
        assert "+    return a + b" in patch and "added.py" in patch and "run.log" not in patch
        assert "a/.git/" not in patch  # the model's own repository is not part of its change
        scratch = w.path.parent
    assert not scratch.exists()
    # the patch applies to a fresh copy of the base and fixes the bug there
    with Worktree.create(r, base) as fresh:
        assert fresh.run("git apply -", CFG, stdin=patch).ok
        assert fresh.run([PY, "-m", "pytest", "-q", "-p", "no:cacheprovider"], CFG).ok


def test_git_worktree_mode_and_prune(repo):
    r, base, _ = repo
    w = Worktree.create(r, base, mode="worktree")
    try:
        assert str(w.path) in git("worktree", "list", cwd=r)
        assert "a - b" in (w.path / "calc.py").read_text()
        assert w.run("git status --short && git log -1 --format=%H", CFG).stdout.strip().endswith(base)
        assert w.run("echo more >> calc.py", CFG).ok
        assert "+more" in w.diff()
    finally:
        w.remove()
    assert str(w.path) not in git("worktree", "list", cwd=r)
    assert not w.path.exists()
    w.remove()  # idempotent


def test_concurrent_worktrees(repo):
    r, base, _ = repo
    made, errors = [], []

    def make(mode):
        try:
            made.append(Worktree.create(r, base, mode=mode))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=make, args=(m,)) for m in ["worktree"] * 4 + ["copy"] * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(made) == 6
    assert len({w.path for w in made}) == 6 and len({w.uid for w in made}) == 6
    results = []
    threads = [threading.Thread(target=lambda w=w: results.append(w.run("cat calc.py", CFG))) for w in made]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(res.ok and "a - b" in res.stdout for res in results)
    threads = [threading.Thread(target=w.remove) for w in made]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert git("worktree", "list", cwd=r).count("\n") == 0  # the main one only


def test_safe_path_refuses_escapes(wt):
    assert wt.run("ln -s /etc/passwd evil && mkdir d && ln -s /etc d/up && ln -s calc.py fine", CFG).ok
    for rel in ("evil", "d/up/passwd", "../outside", "/etc/passwd"):
        with pytest.raises(SandboxError, match="outside"):
            safe_path(wt.path, rel)
    assert safe_path(wt.path, "fine") == wt.path / "calc.py"
    with pytest.raises(SandboxError):
        wt.run("true", CFG, cwd="d/up")


# --------------------------------------------------------------------------------------------
# Writes outside the worktree


def _attempt_writes(wt, outside, only):
    victim, var, etc = outside["victim"], outside["var"], outside["etc"]
    cmds = [
        f"echo pwned > {victim}",
        f"echo pwned > {outside['dir']}/new.txt",
        f"echo pwned > {var}/f",
        f"echo pwned > {etc}",
        f"{PY} -c \"open('{victim}', 'a').write('pwned')\"",
    ]
    return [sbx(wt, c, only=only) for c in cmds]


@pytest.mark.parametrize("only", [None, "mountns", "landlock"])
def test_write_outside_by_absolute_path(wt, outside, only):
    if only and not ALL[only]:
        pytest.skip(f"no {only} here")
    results = _attempt_writes(wt, outside, only)
    assert untouched(outside), [r.stderr for r in results]
    assert results[3].returncode != 0  # /etc: read-only however one looks at it


@pytest.mark.parametrize("only", [None, "mountns", "landlock"])
def test_write_outside_by_dotdot(wt, outside, only):
    if only and not ALL[only]:
        pytest.skip(f"no {only} here")
    rel = os.path.relpath(outside["victim"], wt.path)
    assert rel.startswith("..")
    before = sorted(os.listdir(wt.path.parent))
    for cmd in (f"echo pwned > {rel}", "echo pwned > ../escaped.txt", "cd .. && mkdir x && touch x/y"):
        sbx(wt, cmd, only=only)
    assert untouched(outside)
    assert sorted(os.listdir(wt.path.parent)) == before


@pytest.mark.parametrize("only", [None, "mountns", "landlock"])
def test_write_outside_through_symlinks(wt, outside, only):
    if only and not ALL[only]:
        pytest.skip(f"no {only} here")
    planted = wt.path / "planted"  # one the parent made (say, from the repository itself)
    planted.symlink_to(outside["victim"])
    os.lchown(planted, wt.uid, wt.uid)
    cmds = [
        "echo pwned > planted",
        f"ln -s {outside['victim']} mine && echo pwned > mine",
        f"ln -s {outside['dir']} d && echo pwned > d/new.txt",
        f"ln -s {outside['var']} v && echo pwned > v/f",
        "ln -s /etc e && echo pwned > e/" + outside["etc"].name,
    ]
    results = [sbx(wt, c, only=only) for c in cmds]
    assert untouched(outside), [r.stderr for r in results]


@pytest.mark.parametrize("only", [None, "no_landlock"])
def test_no_escape_through_a_user_namespace(wt, outside, only):
    # Unprivileged user namespaces are allowed here: "root" in a new one must still not be able
    # to remount / read-write, uncover the real /tmp or write outside (Landlock forbids mount
    # changes outright; without it the kernel keeps inherited mounts locked).
    if not (ALL["mountns"] and ALL["uid"]) or shutil.which("unshare") is None:
        pytest.skip("needs the mount namespace, the uid switch and unshare(1)")
    inner = (
        f"mount -o remount,rw /; mount -o remount,rw /etc; umount -l /tmp; umount -l /etc; "
        f"echo pwned > {outside['victim']}; echo pwned > {outside['etc']}; echo pwned > {outside['var']}/f"
    )
    sbx(wt, ["unshare", "-U", "-r", "-m", "sh", "-c", inner], only=only)
    sbx(wt, ["unshare", "-U", "-m", "sh", "-c", inner], only=only)
    assert untouched(outside)


def test_hardlink_to_outside_fails(wt, outside):
    # A hard link would let a later write by the parent (as root) land outside.
    r = wt.run(f"ln {outside['victim']} hl || ln /etc/hostname hl2", CFG)
    assert r.returncode != 0 and not (wt.path / "hl").exists() and not (wt.path / "hl2").exists()


def test_parents_home_and_tmp_are_hidden(wt, tmp_path):
    if not ALL["mountns"]:
        pytest.skip("no mount namespace here")
    (tmp_path / "secret.txt").write_text("s3cret")
    home = os.path.realpath(os.path.expanduser("~"))
    r = wt.run(f"cat {tmp_path}/secret.txt; ls -A {home}; ls -A /tmp", CFG)
    assert "s3cret" not in r.stdout
    # only what is bound back: the worktree and this interpreter's install (a venv may sit in /tmp)
    from envs.swe.sandbox import _interpreter_paths

    bound = {part for p in [wt.path, *_interpreter_paths()] for part in Path(p).parts}
    assert set(r.stdout.split()) <= {"home", *bound}


# --------------------------------------------------------------------------------------------
# Network


@pytest.fixture
def listener():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.3)
    yield srv
    srv.close()


def _connect(port, host="127.0.0.1"):
    return [PY, "-c", f"import socket; socket.create_connection(({host!r}, {port}), timeout=2); print('CONNECTED')"]


@pytest.mark.parametrize("only", [None, "netns", "landlock_tcp"])
def test_no_connection_to_the_host(wt, listener, only):
    if only == "landlock_tcp" and PROBE["landlock_abi"] < 4 or only == "netns" and not ALL["netns"]:
        pytest.skip(f"no {only} here")
    r = sbx(wt, _connect(listener.getsockname()[1]), only=only)
    assert r.returncode != 0 and "CONNECTED" not in r.stdout and "Error" in r.stderr
    with pytest.raises(socket.timeout):
        listener.accept()


@needs("netns")
def test_no_connection_out(wt):
    t = time.monotonic()
    r = wt.run(_connect(53, "1.1.1.1"), CFG)
    assert r.returncode != 0 and "unreachable" in r.stderr.lower()
    udp = "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('8.8.8.8', 53))"
    assert wt.run([PY, "-c", udp], CFG).returncode != 0
    assert time.monotonic() - t < 5
    # loopback of its own works: a test suite may serve and connect on localhost
    serve = "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
    serve += "socket.create_connection(s.getsockname())"
    assert wt.run([PY, "-c", serve], CFG).ok


def test_network_true_reaches_the_host(wt, listener):
    # the control: the attack above is real, and only the sandbox stops it
    r = wt.run(_connect(listener.getsockname()[1]), CFG.model_copy(update={"network": True}))
    assert r.ok and "CONNECTED" in r.stdout
    listener.accept()[0].close()


# --------------------------------------------------------------------------------------------
# Processes, memory, time, output


@pytest.mark.skipif(os.geteuid() == 0 and not ALL["uid"], reason="root without a uid switch: NPROC would not bind")
def test_fork_bomb_is_bounded(wt):
    cfg = CFG.model_copy(update={"max_procs": 16, "timeout_s": 2.0})
    t = time.monotonic()
    r = wt.run("bomb() { bomb | bomb & }; bomb; sleep 30", cfg)
    assert time.monotonic() - t < 6
    assert r.timed_out and r.killed_by_limit == "timeout"
    assert "Resource temporarily unavailable" in r.stderr  # RLIMIT_NPROC stopped it
    assert wait_gone(wt.uid) == []


def test_memory_runaway(wt):
    cfg = CFG.model_copy(update={"memory_mb": 256})
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for code in ("x = bytearray(8 << 30)", "a = []\nwhile True: a.append(bytearray(16 << 20))"):
        r = wt.run([PY, "-c", code], cfg)
        assert r.returncode != 0 and "MemoryError" in r.stderr and r.killed_by_limit == "memory", r
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 << 10  # KiB


def test_infinite_loop_stopped_by_cpu_limit(wt):
    cfg = CFG.model_copy(update={"cpu_s": 1, "timeout_s": 20})
    t = time.monotonic()
    r = wt.run([PY, "-c", "while True: pass"], cfg)
    assert r.killed_by_limit == "cpu" and r.returncode in (-signal.SIGXCPU, -signal.SIGKILL)
    assert time.monotonic() - t < 8
    assert wait_gone(wt.uid) == []


def test_infinite_loop_stopped_by_timeout_with_no_orphan(wt):
    cfg = CFG.model_copy(update={"timeout_s": 1.0})
    t = time.monotonic()
    escapes = "setsid sleep 1000 & (sleep 1000 &); nohup sleep 1000 >/dev/null 2>&1 &"
    r = wt.run(escapes + " while :; do sleep 0.1; done", cfg)
    assert r.timed_out and r.returncode == -signal.SIGKILL
    assert time.monotonic() - t < 4
    assert wait_gone(wt.uid) == []  # the setsid one too


def test_background_processes_die_with_the_command(wt):
    t = time.monotonic()
    r = wt.run("setsid sleep 1000 & sleep 1000 & echo started", CFG)
    assert r.ok and r.stdout == "started\n" and time.monotonic() - t < 3
    assert wait_gone(wt.uid) == []


def test_gigabytes_of_output(wt):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.monotonic()
    r = wt.run("yes 'spam spam spam spam'", CFG)  # unbounded: killed at max_output_mb
    assert r.killed_by_limit == "output" and r.truncated and r.returncode == -signal.SIGKILL
    assert len(r.stdout) < CFG.output_chars + 200 and r.stdout.startswith("spam")
    assert time.monotonic() - t < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 << 10
    assert wait_gone(wt.uid) == []


def test_gigabytes_into_a_file(wt):
    r = wt.run(["bash", "-c", "exec head -c 4G /dev/zero > big.bin"], CFG)
    assert r.killed_by_limit == "file_size" and r.returncode == -signal.SIGXFSZ
    r = wt.run("head -c 4G /dev/zero > big2.bin; echo done", CFG)  # the shell lives on
    assert r.ok and r.stdout == "done\n" and "File size limit exceeded" in r.stderr
    r = wt.run([PY, "-c", "open('big3.bin', 'wb').write(bytes(64 << 20))"], CFG)
    assert r.killed_by_limit == "file_size" and "File too large" in r.stderr
    for name in ("big.bin", "big2.bin", "big3.bin"):
        assert (wt.path / name).stat().st_size <= CFG.file_mb << 20


# --------------------------------------------------------------------------------------------
# The parent: its environment, its life


@pytest.mark.parametrize("only", [None, "uid", "pidns"])
def test_parent_environment_is_invisible(wt, monkeypatch, only):
    if only and not ALL[only]:
        pytest.skip(f"no {only} here")
    secret = f"s3cret-{uuid.uuid4().hex}"
    monkeypatch.setenv("TURNSTILE_SANDBOX_SECRET", secret)  # what a child of ours would inherit
    # /proc/<pid>/environ shows a process's environment as it was at exec: a stand-in parent
    # started with the secret in it.
    parent = subprocess.Popen(["sleep", "60"], env={**os.environ})
    try:
        probe = (
            "env; cat /proc/self/environ; "
            f"for p in {parent.pid} {os.getpid()} {os.getppid()} 1 $PPID; do cat /proc/$p/environ; done; "
            f"grep -a -r -l {secret} /proc/*/environ"
        )
        r = sbx(wt, probe, CFG.model_copy(update={"output_chars": 1 << 20}), only=only)
    finally:
        parent.kill()
        parent.wait()
    assert not r.truncated and "PATH=" in r.stdout
    assert secret not in r.stdout and secret not in r.stderr
    assert "TURNSTILE_SANDBOX_SECRET" not in r.stdout


@pytest.mark.parametrize("only", [None, "uid", "pidns", "landlock"])
def test_cannot_kill_the_parent(wt, only):
    if only and not ALL[only] or only == "landlock" and PROBE["landlock_abi"] < 6:
        pytest.skip(f"no {only} (signal scoping) here")
    victim = subprocess.Popen(["sleep", "60"])  # stands in for the parent: the test's own pid gets signal 0
    try:
        # Signal 0 to the test and its parent (a check that kills nothing), SIGKILL to the
        # stand-in; and kill -1 (everything the caller may signal) only with all layers and only
        # once the others failed: a broken sandbox must fail this test, not take the machine down.
        cmd = (
            f"for p in {os.getpid()} {os.getppid()}; do kill -0 $p && echo SIGNALLED $p && hit=1; done; "
            f"kill -9 {victim.pid} && echo SIGNALLED {victim.pid} && hit=1; "
            f"if [ -z \"$hit\" ] && {'true' if only is None else 'false'}; then kill -9 -1; fi; true"
        )
        r = sbx(wt, cmd, only=only)
        assert "SIGNALLED" not in r.stdout, r
        assert r.stderr.count("Operation not permitted") + r.stderr.count("No such process") >= 3, r  # it ran
        assert victim.poll() is None  # still alive
    finally:
        victim.kill()
        victim.wait()


# --------------------------------------------------------------------------------------------
# Docker


def test_docker_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    assert "not installed" in docker_missing()
    with pytest.raises(SandboxError, match="docker.*not installed"):
        Container.start("swe-gym/instance", SandboxConfig(sandbox="docker"))
    with pytest.raises(SandboxError, match="Container"):
        run("true", "/testbed", SandboxConfig(sandbox="docker"))
    assert isolation_report(SandboxConfig(sandbox="docker"))["allowed"] is False


def test_docker_without_a_daemon_says_so():
    missing = docker_missing()
    if missing is None:
        pytest.skip("docker works here")
    with pytest.raises(SandboxError, match="docker"):
        Container.start("swe-gym/instance", SandboxConfig(sandbox="docker"))


def test_docker_command_lines():
    limits = dict(timeout_s=30, cpu_s=20, memory_mb=2048, max_procs=64, file_mb=16, env={"A": "1"})
    cfg = SandboxConfig(sandbox="docker", **limits)
    argv = docker_run_argv("img:tag", cfg, "ep1")
    joined = " ".join(argv)
    for flag in ("--network none", "--memory 2048m", "--memory-swap 2048m", "--pids-limit 64", "--cap-drop ALL",
                 "--security-opt no-new-privileges", f"--ulimit fsize={16 << 20}:{16 << 20}", "--name ep1"):
        assert flag in joined, flag
    assert argv[-2:] == ["img:tag", "infinity"]
    assert "--network bridge" in " ".join(docker_run_argv("img", cfg.model_copy(update={"network": True}), "e"))
    ex = docker_exec_argv("ep1", "pytest -x", cfg, cwd="/testbed/src")
    assert ex[:2] == ["docker", "exec"] and "ep1" in ex and ex[-3:] == ["bash", "-c", "pytest -x"]
    joined = " ".join(ex)
    for flag in ("--workdir /testbed/src", "--env A=1", "timeout --signal=KILL 30", "--cpu=20:21",
                 f"--as={2048 << 20}", "--nproc=64", f"--fsize={16 << 20}"):
        assert flag in joined, flag
