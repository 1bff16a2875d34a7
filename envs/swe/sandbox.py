"""Running model commands in a sandbox (issue 15, part 4): one private copy of the repository per
episode, every command bounded in time and resources, no network, writes confined to the copy.

    from envs.swe.sandbox import SandboxConfig, Worktree, isolation_report

    cfg = SandboxConfig(timeout_s=30)
    with Worktree.create(repo, commit) as wt:          # the repository at `commit`, in a temp dir
        res = wt.run("python -m pytest -q -x", cfg)    # RunResult: returncode, stdout, stderr, ...
        patch = wt.diff()                              # the episode's changes, as a git patch
    isolation_report()                                 # what is in force on this machine

`env.sandbox: local` (the default) runs each command through a small launcher (a fresh
`python -I -S`, so that no `preexec_fn` runs in a threaded parent) that stacks these layers:

- timeout: a wall-clock limit; on expiry the launcher's process group and its pid namespace are
  SIGKILLed, so nothing the command started survives (a `setsid` child included).
- rlimits: CPU seconds, address space, processes, file size, open files, no core files.
- uid: as root, each Worktree belongs to its own fresh unprivileged uid and commands run as that
  uid: other files are theirs by permission only, the parent and other episodes cannot be
  signalled, and RLIMIT_NPROC counts this episode's processes alone.
- pid namespace: the command is pid 1's child in a namespace of its own (with its own /proc):
  it cannot see or signal any outside process, and everything in it dies with the command.
- network namespace: only a loopback interface of its own (`network: false`).
- mount namespace: the whole filesystem read-only; private tmpfs on /tmp, /var/tmp, /dev/shm;
  the parent's HOME hidden (but for the interpreter's prefix, read-only); the worktree read-write.
- Landlock (where the kernel has it): writes only beneath the worktree and the private temp dirs;
  signals and abstract unix sockets scoped to the sandbox; TCP denied when there is no netns.
- no_new_privs (setuid binaries gain nothing) and an environment scrubbed to PATH, a temporary
  HOME, TMPDIR, a UTF-8 locale and `SandboxConfig.env`.

A layer the machine lacks is left out and `isolation_report()` says so; a run is refused
(SandboxError) when even the timeout and the rlimits cannot be had, or when `cfg.require` names
a layer that is missing. `env.sandbox: docker` runs commands in a per-instance image through
`Container` (SWE-Gym's images hold the repository at /testbed) with the same limits expressed as
docker flags; without a reachable docker daemon it raises a SandboxError saying what is missing.

Code running outside the sandbox must not trust the worktree: the model can plant symlinks
(resolve paths with `safe_path`) and git configuration (never run git in it as root; `diff()`
runs git inside the sandbox against a git directory the model cannot write).
"""

from __future__ import annotations

import contextlib
import fcntl
import inspect
import json
import os
import random
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field

Layer = Literal["uid", "netns", "mountns", "pidns", "landlock"]
LimitKind = Literal["timeout", "cpu", "memory", "file_size", "output"]

# The sandbox's own HOME and temp dir inside a mount namespace (both on the private /tmp tmpfs).
_NS_TMP = "/tmp"
_NS_HOME = "/tmp/home"
# Fresh sandbox uids are drawn from here: far above any real account, below 2**31.
_UID_RANGE = (1_000_000_000, 2_000_000_000)
_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class SandboxError(RuntimeError):
    """The sandbox cannot run the command as asked (missing isolation, docker, a bad path...)."""


class SandboxConfig(BaseModel):
    """Limits of one sandboxed command (`env.sandbox.*` in a recipe)."""

    model_config = ConfigDict(extra="forbid")

    sandbox: Literal["local", "docker"] = Field("local", description="local: namespaces/uid/rlimits; docker: images")
    timeout_s: float = Field(60.0, gt=0, description="wall-clock limit of one command")
    cpu_s: int = Field(60, gt=0, description="RLIMIT_CPU per process (SIGXCPU, then SIGKILL a second later)")
    memory_mb: int = Field(4096, gt=0, description="RLIMIT_AS per process (docker: --memory of the container)")
    max_procs: int = Field(128, gt=0, description="RLIMIT_NPROC: processes and threads of the sandbox uid")
    file_mb: int = Field(256, gt=0, description="RLIMIT_FSIZE: largest file a command may write")
    open_files: int = Field(1024, gt=0, description="RLIMIT_NOFILE")
    output_chars: int = Field(20_000, gt=0, description="stdout and stderr are each cut to this (head + tail)")
    max_output_mb: int = Field(64, gt=0, description="the command is killed once it wrote this much output")
    tmp_mb: int = Field(512, gt=0, description="size of each private tmpfs (/tmp, /var/tmp, /dev/shm)")
    network: bool = Field(False, description="false: no network (own netns, or Landlock TCP denial)")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment variables (PATH overrides)")
    readonly_paths: list[str] = Field(
        default_factory=list, description="host paths to keep visible (read-only) though under a hidden dir"
    )
    require: list[Layer] = Field(default_factory=list, description="refuse to run unless these layers are in force")
    docker_cpus: float = Field(1.0, gt=0, description="docker: --cpus")


class RunResult(BaseModel):
    """What one command did. stdout/stderr are cut to `output_chars` with a marker in the middle."""

    returncode: int  # negative: killed by that signal (a killed timeout reads -9)
    stdout: str
    stderr: str
    timed_out: bool = False
    killed_by_limit: LimitKind | None = None  # "memory" is inferred (allocation failure + exit)
    seconds: float = 0.0
    truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


# ---------------------------------------------------------------------------------------------
# The launcher: runs in a fresh interpreter, as the caller's user (root on the training machines)


def _launcher() -> None:
    """The sandbox launcher. Its source is sent to `python -I -S -c` (see `_launcher_source`), so it
    must stay self-contained: stdlib imports inside, no names from this module. argv[1] is a JSON
    spec from `_run_local` (or {"probe": ...}). Processes:

      L  unshares the namespaces, forks I and waits for it (without a pid namespace L is I);
      I  pid 1 of the new pid namespace: builds the mount namespace, brings up loopback, makes
         HOME, forks C, reaps until C exits, writes C's wait status to the status fd and exits;
         the kernel then kills whatever is left in the namespace;
      C  sets the rlimits, drops to the sandbox uid, sets no_new_privs, enters Landlock, chdirs
         and execs the command.

    A failure before exec is written to the status fd as {"error": ...} and the command never
    runs; the parent turns it into a SandboxError."""
    import ctypes
    import fcntl
    import json
    import os
    import resource
    import signal
    import socket
    import stat
    import struct
    import sys
    import warnings  # noqa: F401 - os.execvpe imports it lazily, after the uid is dropped

    spec = json.loads(sys.argv[1])
    status_fd = spec["status_fd"]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    libc.unshare.argtypes = [ctypes.c_int]
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]

    CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
    CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
    MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 8, 4096, 16384, 1 << 18
    MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = 1, 2
    PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
    SYS_MOUNT_SETATTR, SYS_LL_CREATE, SYS_LL_ADD, SYS_LL_RESTRICT = 442, 444, 445, 446

    def report(**obj):
        os.write(status_fd, (json.dumps(obj) + "\n").encode())

    def fail(what, exc):
        report(error=f"{what}: {exc}")
        os._exit(125)

    def check(ret, what):
        if ret < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")
        return ret

    def enc(s):
        return None if s is None else os.fsencode(s)

    def unshare(flags):
        check(libc.unshare(flags), "unshare")

    def mount(src, dst, fstype=None, flags=0, data=None):
        check(libc.mount(enc(src), enc(dst), enc(fstype), flags, enc(data)), f"mount {dst}")

    def mount_setattr(path, set_=0, clr=0):  # recursive, on the mount at `path`
        attr = ctypes.create_string_buffer(struct.pack("QQQQ", set_, clr, 0, 0), 32)
        args = (ctypes.c_int(-100), enc(path), ctypes.c_uint(0x8000), attr, ctypes.c_size_t(32))
        check(libc.syscall(ctypes.c_long(SYS_MOUNT_SETATTR), *args), f"mount_setattr {path}")

    def landlock_abi():
        r = libc.syscall(ctypes.c_long(SYS_LL_CREATE), None, ctypes.c_size_t(0), ctypes.c_uint(1))
        return max(int(r), 0)

    def landlock(write_dirs, write_files, deny_tcp):
        abi = landlock_abi()
        if abi < 1:
            raise OSError("Landlock is not available")
        # WRITE_FILE REMOVE_DIR REMOVE_FILE MAKE_DIR MAKE_REG MAKE_SOCK MAKE_FIFO MAKE_SYM
        dir_rights = 2 | 16 | 32 | 128 | 256 | 512 | 1024 | 4096
        handled = dir_rights | 64 | 2048  # + MAKE_CHAR MAKE_BLOCK, never granted
        file_rights = 2
        if abi >= 2:  # REFER (rename/link across directories)
            handled, dir_rights = handled | 8192, dir_rights | 8192
        if abi >= 3:  # TRUNCATE
            handled, dir_rights, file_rights = handled | 16384, dir_rights | 16384, file_rights | 16384
        net = 1 | 2 if deny_tcp and abi >= 4 else 0  # BIND_TCP CONNECT_TCP, with no port allowed
        if deny_tcp and abi < 4:
            raise OSError("Landlock cannot deny TCP before ABI 4")
        scoped = 1 | 2 if abi >= 6 else 0  # ABSTRACT_UNIX_SOCKET SIGNAL
        size = 24 if abi >= 6 else 16 if abi >= 4 else 8
        attr = ctypes.create_string_buffer(struct.pack("QQQ", handled, net, scoped)[:size], size)
        rfd = check(libc.syscall(ctypes.c_long(SYS_LL_CREATE), attr, ctypes.c_size_t(size), ctypes.c_uint(0)), "ll")
        rules = [(d, dir_rights) for d in write_dirs] + [(f, file_rights) for f in write_files]
        for path, rights in rules:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            rule = ctypes.create_string_buffer(struct.pack("<Qi", rights, fd), 12)
            args = (ctypes.c_int(rfd), ctypes.c_int(1), rule, ctypes.c_uint(0))
            check(libc.syscall(ctypes.c_long(SYS_LL_ADD), *args), f"landlock_add_rule {path}")
            os.close(fd)
        check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
        check(libc.syscall(ctypes.c_long(SYS_LL_RESTRICT), ctypes.c_int(rfd), ctypes.c_uint(0)), "landlock_restrict")
        os.close(rfd)

    def loopback_up():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            flags = struct.unpack("16sH22x", fcntl.ioctl(s, 0x8913, struct.pack("16sH22x", b"lo", 0)))[1]
            fcntl.ioctl(s, 0x8914, struct.pack("16sH22x", b"lo", flags | 1))  # SIOCSIFFLAGS IFF_UP

    def drop_uid(uid, gid):
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)

    def build_mounts():
        mount(None, "/", None, MS_REC | MS_PRIVATE)
        # Opened before anything is covered: a bind under a hidden dir comes back from its fd.
        binds = [(os.open(p, os.O_PATH | os.O_CLOEXEC), p, rw) for p, rw in spec["binds"]]
        mount_setattr("/", set_=MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID)
        for path, options in spec["tmpfs"]:
            mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, options)
        for fd, path, rw in sorted(binds, key=lambda b: b[1].count("/")):
            if os.path.isdir(f"/proc/self/fd/{fd}"):
                os.makedirs(path, exist_ok=True)
            elif not os.path.exists(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))
            mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
            mount_setattr(path, clr=MOUNT_ATTR_RDONLY) if rw else mount_setattr(path, set_=MOUNT_ATTR_RDONLY)
            os.close(fd)
        if spec["pidns"]:
            mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)

    def make_home():
        home, uid, gid = spec["home"], spec["uid"], spec["gid"]
        os.makedirs(home, mode=0o700, exist_ok=True)
        with open(os.path.join(home, ".gitconfig"), "w") as f:
            f.write(spec["gitconfig"])
        if uid is not None:
            os.chown(home, uid, gid)
            os.chown(os.path.join(home, ".gitconfig"), uid, gid)

    def child():
        try:
            os.set_inheritable(status_fd, False)
            am_root = os.geteuid() == 0
            for name, soft, hard in spec["rlimits"]:
                res = getattr(resource, "RLIMIT_" + name)
                cur_hard = resource.getrlimit(res)[1]
                if not am_root and cur_hard != resource.RLIM_INFINITY:
                    hard, soft = min(hard, cur_hard), min(soft, cur_hard)
                resource.setrlimit(res, (soft, hard))
            if spec["uid"] is not None:
                for fd in (0, 1, 2):  # our pipes and stdin file, so that /dev/stdout etc. can be reopened
                    mode = os.fstat(fd).st_mode
                    if stat.S_ISFIFO(mode) or stat.S_ISREG(mode):
                        os.fchown(fd, spec["uid"], spec["gid"])
                drop_uid(spec["uid"], spec["gid"])
            check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
            if spec["landlock"]:
                landlock(spec["write_dirs"], spec["write_files"], spec["landlock_tcp"])
            os.chdir(spec["cwd"])
            os.umask(0o022)
        except BaseException as exc:  # noqa: B036 - nothing may run unconfined
            fail("sandbox setup", exc)
        argv = spec["argv"]
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):  # Python ignores these, and exec keeps that
            signal.signal(sig, signal.SIG_DFL)
        try:
            os.execvpe(argv[0], argv, spec["env"])
        except OSError as exc:
            os.write(2, f"sandbox: {argv[0]}: {exc.strerror}\n".encode())
            os._exit(127 if isinstance(exc, FileNotFoundError) else 126)

    def trial(fn):  # fn() in a throwaway child: True when it worked
        pid = os.fork()
        if pid == 0:
            try:
                fn()
                os._exit(0)
            except BaseException:  # noqa: B036
                os._exit(1)
        return os.waitpid(pid, 0)[1] == 0

    def probe():
        root = os.geteuid() == 0

        def netns():
            unshare(CLONE_NEWNET)
            loopback_up()

        def mountns():
            unshare(CLONE_NEWNS)
            mount(None, "/", None, MS_REC | MS_PRIVATE)
            mount_setattr("/", set_=MOUNT_ATTR_RDONLY)
            mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "size=1m")

        def pidns():
            unshare(CLONE_NEWPID)
            pid = os.fork()
            if pid == 0:
                os._exit(0 if os.getpid() == 1 else 1)
            if os.waitpid(pid, 0)[1] != 0:
                raise OSError("not pid 1")

        def rlimits():
            for name in ("CPU", "AS", "NPROC", "FSIZE", "NOFILE", "CORE"):
                res = getattr(resource, "RLIMIT_" + name)
                resource.setrlimit(res, resource.getrlimit(res))

        def uid():
            drop_uid(spec["probe_uid"], spec["probe_uid"])

        def ll():
            landlock([], [], False)
            try:
                os.close(os.open("/dev/null", os.O_WRONLY))
            except PermissionError:
                return
            raise OSError("Landlock did not deny a write")

        report(
            probe={
                "root": root,
                "uid": root and trial(uid),
                "netns": root and trial(netns),
                "mountns": root and trial(mountns),
                "pidns": root and trial(pidns),
                "landlock_abi": landlock_abi() if trial(ll) else 0,
                "rlimits": trial(rlimits),
            }
        )

    if "probe_uid" in spec:
        probe()
        return
    try:
        os.umask(0o022)
        flags = (CLONE_NEWNET if spec["netns"] else 0) | (CLONE_NEWNS if spec["mountns"] else 0)
        flags |= CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS if spec["pidns"] else 0
        if flags:
            unshare(flags)
        if spec["pidns"]:
            pid = os.fork()
            if pid:  # L: wait for I, then go
                while True:
                    try:
                        os.waitpid(pid, 0)
                        os._exit(0)
                    except InterruptedError:
                        continue
            check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
        if spec["mountns"]:
            build_mounts()
        if spec["netns"]:
            loopback_up()
        make_home()
    except BaseException as exc:  # noqa: B036
        fail("sandbox setup", exc)
    c = os.fork()
    if c == 0:
        child()
    while True:  # as pid 1, also reap the orphans
        try:
            pid, status, usage = os.wait4(-1, 0)
        except InterruptedError:
            continue
        if pid == c:
            break
    report(status=status, cpu_s=usage.ru_utime + usage.ru_stime, maxrss_kb=usage.ru_maxrss)
    if not spec["pidns"]:  # no namespace to take the rest with it: at least the process group
        os.killpg(0, signal.SIGKILL)
    os._exit(0)


_LAUNCHER_SRC: str | None = None
# The launcher's command line stays short (the sandbox sees it as /proc/1/cmdline): the source and
# the spec come through a pipe, filled before the launcher starts.
_BOOT = (
    "import json,os,sys;f=int(sys.argv[1]);p=json.loads(os.read(f,1<<20));os.close(f);"
    "sys.argv[1:]=[p[1]];exec(p[0])"
)


def _launcher_source() -> str:
    global _LAUNCHER_SRC
    if _LAUNCHER_SRC is None:
        _LAUNCHER_SRC = textwrap.dedent(inspect.getsource(_launcher)) + "\n_launcher()\n"
    return _LAUNCHER_SRC


def _launcher_argv(spec: dict) -> tuple[list[str], int]:
    """The launcher's argv, and the fd (to pass, then close) it reads its source and `spec` from."""
    payload = json.dumps([_launcher_source(), json.dumps(spec)]).encode()
    if len(payload) >= 65536:  # a pipe holds 64 KiB: written whole before the launcher reads
        raise SandboxError("sandbox: the launch spec is too long (too many or too long paths)")
    r, w = os.pipe()
    os.write(w, payload)
    os.close(w)
    return [sys.executable, "-I", "-S", "-c", _BOOT, str(r)], r


# ---------------------------------------------------------------------------------------------
# Reading a child's output with caps, and the wall clock


class _Capture:
    """The first and the last `keep` bytes of a stream, and how long it was, in bounded memory."""

    def __init__(self, keep: int):
        self.keep, self.head, self.tail, self.total = keep, bytearray(), bytearray(), 0

    def feed(self, data: bytes) -> None:
        self.total += len(data)
        room = self.keep - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail += data
            if len(self.tail) > 2 * self.keep:
                del self.tail[: len(self.tail) - self.keep]

    def text(self, chars: int) -> tuple[str, bool]:
        """The decoded stream cut to `chars` characters (head and tail), and whether it was cut."""
        back = chars // 2
        front = chars - back
        if self.total == len(self.head) + len(self.tail):
            s = bytes(self.head + self.tail).decode("utf-8", "replace")
            if len(s) <= chars:
                return s, False
            cut = f"\n[... {len(s) - chars} characters truncated ...]\n"
            return s[:front] + cut + (s[-back:] if back else ""), True
        head = bytes(self.head).decode("utf-8", "replace")[:front]
        tail = bytes(self.tail[-self.keep :]).decode("utf-8", "replace")[-back:] if back else ""
        return head + f"\n[... truncated: {self.total} bytes of output in all ...]\n" + tail, True


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _pump(
    proc: subprocess.Popen, cfg: SandboxConfig, status_fd: int | None, deadline: float
) -> tuple[_Capture, _Capture, bytes, LimitKind | None]:
    """Read stdout, stderr (capped) and the status pipe until they close, the deadline passes or
    the output passes `max_output_mb`; then SIGKILL the process group. Returns the captures, the
    status bytes and which limit (timeout/output) ended it, if one did."""
    keep = 4 * cfg.output_chars
    caps = {proc.stdout.fileno(): _Capture(keep), proc.stderr.fileno(): _Capture(keep)}
    status = bytearray()
    sel = selectors.DefaultSelector()
    for fd in [*caps, *([status_fd] if status_fd is not None else [])]:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    limit, written, max_bytes, grace_end = None, 0, cfg.max_output_mb << 20, None
    try:
        while sel.get_map():
            now = time.monotonic()
            if grace_end is not None and now >= grace_end:
                break  # the command is done; a straggler keeps a pipe open (no pid namespace)
            if now >= deadline:
                limit = "timeout"
                break
            wait = min(deadline, grace_end or deadline) - now
            for key, _ in sel.select(wait):
                try:
                    data = os.read(key.fd, 1 << 16)
                except BlockingIOError:
                    continue
                if not data:
                    sel.unregister(key.fd)
                elif key.fd == status_fd:
                    status += data
                    if b'"status"' in status and grace_end is None:
                        grace_end = time.monotonic() + 1.0
                else:
                    caps[key.fd].feed(data)
                    written += len(data)
            if written > max_bytes:
                limit = "output"
                break
    finally:
        _kill_group(proc.pid)  # before the wait: the pgid cannot have been reused yet
        if status_fd is not None:  # what the launcher wrote before it was killed
            with contextlib.suppress(OSError):
                while chunk := os.read(status_fd, 1 << 16):
                    status += chunk
        sel.close()
        proc.wait()
    return caps[proc.stdout.fileno()], caps[proc.stderr.fileno()], bytes(status), limit


def _result(
    out: _Capture, err: _Capture, cfg: SandboxConfig, returncode: int, limit: LimitKind | None, seconds: float
) -> RunResult:
    stdout, cut_out = out.text(cfg.output_chars)
    stderr, cut_err = err.text(cfg.output_chars)
    return RunResult(
        returncode=returncode,
        stdout=stdout,
        stderr=stderr,
        timed_out=limit == "timeout",
        killed_by_limit=limit,
        seconds=round(seconds, 3),
        truncated=cut_out or cut_err,
    )


# ---------------------------------------------------------------------------------------------
# What this machine allows


_PROBE: dict | None = None
_PROBE_LOCK = threading.Lock()


def _probe() -> dict:
    """Which layers the kernel and our privileges allow (run once per process, in the launcher)."""
    global _PROBE
    with _PROBE_LOCK:
        if _PROBE is None:
            r, w = os.pipe()
            raw = b""
            try:
                argv, spec_fd = _launcher_argv({"status_fd": w, "probe_uid": _fresh_uid()})
                try:
                    proc = subprocess.run(argv, pass_fds=(w, spec_fd), capture_output=True, env={}, timeout=60)
                finally:
                    os.close(spec_fd)
                os.close(w)
                w = -1
                os.set_blocking(r, False)
                with contextlib.suppress(BlockingIOError):
                    raw = os.read(r, 1 << 16)
            finally:
                os.close(r)
                if w >= 0:
                    os.close(w)
            try:
                _PROBE = json.loads(raw)["probe"]
            except (ValueError, KeyError):
                raise SandboxError(f"the sandbox launcher failed: {proc.stderr.decode(errors='replace')}") from None
        return dict(_PROBE)


def isolation_report(cfg: SandboxConfig | None = None) -> dict:
    """What a command run with `cfg` gets on this machine: each layer in force or not, how
    writes are confined, how the network is cut, and whether runs are allowed at all."""
    cfg = cfg or SandboxConfig()
    if cfg.sandbox == "docker":
        missing = docker_missing()
        return {"sandbox": "docker", "docker": missing or "available", "allowed": missing is None}
    probe = _probe()
    layers = _layers(probe, cfg)
    writes = [name for name, on in (("uid", layers["uid"]), ("mount-readonly", layers["mountns"])) if on]
    writes += ["landlock"] if layers["landlock"] else []
    if cfg.network:
        network = "allowed"
    else:
        network = "netns" if layers["netns"] else "landlock-tcp" if layers["landlock_tcp"] else "NOT CUT"
    return {
        "sandbox": "local",
        "root": probe["root"],
        "timeout": True,
        "rlimits": ["CPU", "AS", "NPROC", "FSIZE", "NOFILE", "CORE"] if probe["rlimits"] else [],
        **{k: layers[k] for k in ("uid", "pidns", "netns", "mountns", "landlock")},
        "landlock_abi": probe["landlock_abi"],
        "no_new_privs": True,
        "write_confinement": writes,
        "network": network,
        "processes": "pid namespace" if layers["pidns"] else "process group",
        "environment": "scrubbed",
        "allowed": probe["rlimits"] and not _missing(layers, cfg),
    }


def _layers(probe: dict, cfg: SandboxConfig) -> dict[str, bool]:
    landlock = probe["landlock_abi"] >= 1
    netns = probe["netns"] and not cfg.network
    return {
        "uid": probe["uid"],
        "pidns": probe["pidns"],
        "netns": netns,
        "mountns": probe["mountns"],
        "landlock": landlock,
        "landlock_tcp": landlock and probe["landlock_abi"] >= 4 and not cfg.network and not netns,
    }


def _missing(layers: dict[str, bool], cfg: SandboxConfig) -> list[str]:
    return [name for name in cfg.require if not (layers[name] or (name == "netns" and cfg.network))]


# ---------------------------------------------------------------------------------------------
# Running a command


def run(
    cmd: list[str] | str,
    cwd: str | Path,
    cfg: SandboxConfig,
    stdin: str | None = None,
    *,
    root: str | Path | None = None,
    readonly: Sequence[str | Path] = (),
    writable: Sequence[str | Path] = (),
    container: str | None = None,
) -> RunResult:
    """Run `cmd` (an argv list, or a string for `bash -c`) in the sandbox, in `cwd`.

    Writes are allowed beneath `root` (default: `cwd`), which must belong to the sandbox uid
    (a Worktree does; else `give_to_sandbox(root)`), and beneath the `writable` dirs (the same
    uid's: a scratch dir for a result file, say; `give_to_sandbox(d, uid=wt.uid)`). `readonly`
    paths stay visible though under a hidden dir (/tmp, the parent's HOME). `stdin` is fed to
    the command (else /dev/null). Docker: `container` names a started `Container`."""
    if cfg.sandbox == "docker":
        if container is None:
            raise SandboxError("sandbox: docker runs commands in an instance's container: use Container.start(...)")
        return _run_docker(cmd, str(cwd), cfg, stdin, container)
    return _run_local(cmd, Path(cwd), cfg, stdin, root=root, readonly=readonly, writable=writable)


def _argv(cmd: list[str] | str) -> list[str]:
    if isinstance(cmd, str):
        return ["bash" if shutil.which("bash") else "sh", "-c", cmd]
    if not cmd:
        raise SandboxError("sandbox: empty command")
    return [str(c) for c in cmd]


def _interpreter_paths() -> list[str]:
    """This interpreter's install, which commands need to see though it may be under the hidden HOME."""
    paths = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, os.path.dirname(sys.executable))}
    return sorted(p for p in paths if not any(p != q and p.startswith(q + "/") for q in paths))


def _env(cfg: SandboxConfig, home: str, tmp: str) -> dict[str, str]:
    exe_dir = os.path.dirname(os.path.realpath(sys.executable))
    env = {
        "PATH": f"{exe_dir}:{_DEFAULT_PATH}",
        "HOME": home,
        "TMPDIR": tmp,
        "USER": "sandbox",
        "LOGNAME": "sandbox",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "TERM": "dumb",
        "PAGER": "cat",
        "GIT_PAGER": "cat",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    env.update(cfg.env)
    return env


_GITCONFIG = """[safe]
\tdirectory = *
[user]
\tname = sandbox
\temail = sandbox@localhost
[core]
\tpager = cat
[init]
\tdefaultBranch = main
[commit]
\tgpgsign = false
"""


def _run_local(
    cmd: list[str] | str,
    cwd: Path,
    cfg: SandboxConfig,
    stdin: str | None,
    *,
    root: str | Path | None = None,
    readonly: Sequence[str | Path] = (),
    writable: Sequence[str | Path] = (),
    layers: dict[str, bool] | None = None,
) -> RunResult:
    """run() for `sandbox: local`. `layers` overrides the probed layers (tests take some away)."""
    probe = _probe()
    if not probe["rlimits"]:
        raise SandboxError("sandbox: cannot set rlimits here; refusing to run model commands with only a timeout")
    layers = dict(layers if layers is not None else _layers(probe, cfg))
    if missing := _missing(layers, cfg):
        raise SandboxError(f"sandbox: cfg.require names {missing}, not in force here ({isolation_report(cfg)})")
    cwd = cwd.resolve()
    root = Path(root).resolve() if root is not None else cwd
    if not cwd.is_dir():
        raise SandboxError(f"sandbox: no such directory: {cwd}")
    if not cwd.is_relative_to(root):
        raise SandboxError(f"sandbox: cwd {cwd} is outside the writable root {root}")
    uid = gid = None
    if layers["uid"]:
        st = root.stat()
        if st.st_uid == 0:
            raise SandboxError(
                f"sandbox: {root} belongs to root, so a sandboxed command could not write it: "
                "make it with Worktree.create or call give_to_sandbox() on it first"
            )
        uid, gid = st.st_uid, st.st_gid
    extra = [str(Path(p).resolve()) for p in writable]
    for p in extra:
        if not os.path.isdir(p) or (uid is not None and os.stat(p).st_uid != uid):
            raise SandboxError(f"sandbox: writable dir {p} is missing or not the sandbox uid's (give_to_sandbox)")

    scratch = None
    if layers["mountns"]:
        home, tmp = _NS_HOME, _NS_TMP
        hidden = [d for d in ("/tmp", "/var/tmp", "/dev/shm") if os.path.isdir(d)]
        tmpfs = [[d, f"size={cfg.tmp_mb}m,mode=1777"] for d in hidden]
        parent_home = os.path.realpath(os.path.expanduser("~"))
        if parent_home not in ("/", *hidden) and os.path.isdir(parent_home):
            tmpfs.append([parent_home, "size=1m,mode=0755"])
        ro = [*_interpreter_paths(), *cfg.readonly_paths, *map(str, readonly)]
        binds = [[p, True] for p in (str(root), *extra)]
        binds += [[os.path.realpath(p), False] for p in ro if os.path.exists(p)]
        write_dirs = [str(root), *extra, *hidden]
    else:  # no private /tmp: a per-run temp dir for HOME and TMPDIR
        scratch = tempfile.mkdtemp(prefix="turnstile-sandbox-")
        if uid is not None:
            os.chown(scratch, uid, gid)
        home, tmp, tmpfs, binds = os.path.join(scratch, "home"), scratch, [], []
        write_dirs = [str(root), *extra, scratch]
    spec = {
        "argv": _argv(cmd),
        "cwd": str(cwd),
        "env": _env(cfg, home, tmp),
        "uid": uid,
        "gid": gid,
        "home": home,
        "gitconfig": _GITCONFIG,
        "rlimits": [
            ["CPU", cfg.cpu_s, cfg.cpu_s + 1],
            ["AS", cfg.memory_mb << 20, cfg.memory_mb << 20],
            ["NPROC", cfg.max_procs, cfg.max_procs],
            ["FSIZE", cfg.file_mb << 20, cfg.file_mb << 20],
            ["NOFILE", cfg.open_files, cfg.open_files],
            ["CORE", 0, 0],
        ],
        "netns": layers["netns"],
        "mountns": layers["mountns"],
        "pidns": layers["pidns"],
        "tmpfs": tmpfs,
        "binds": binds,
        "landlock": layers["landlock"],
        "landlock_tcp": layers["landlock"] and layers["landlock_tcp"],
        "write_dirs": write_dirs,
        "write_files": [f for f in ("/dev/null", "/dev/zero", "/dev/full") if os.path.exists(f)],
    }
    status_r, status_w = os.pipe()
    stdin_file = None
    try:
        if stdin is not None:
            stdin_file = tempfile.TemporaryFile()
            stdin_file.write(stdin.encode())
            stdin_file.seek(0)
        spec["status_fd"] = status_w
        argv, spec_fd = _launcher_argv(spec)
        start = time.monotonic()
        try:
            proc = subprocess.Popen(
                argv,
                stdin=stdin_file if stdin_file is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(status_w, spec_fd),
                start_new_session=True,
                env={},
                cwd="/",
            )
        finally:
            os.close(spec_fd)
            os.close(status_w)
            status_w = -1
        with proc:
            out, err, status, limit = _pump(proc, cfg, status_r, start + cfg.timeout_s)
        seconds = time.monotonic() - start
    finally:
        os.close(status_r)
        if status_w >= 0:
            os.close(status_w)
        if stdin_file is not None:
            stdin_file.close()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)

    msgs = [json.loads(line) for line in status.decode(errors="replace").splitlines() if line.startswith("{")]
    if errors := [m["error"] for m in msgs if "error" in m]:
        raise SandboxError(f"sandbox: the command did not run: {errors[0]}")
    done = next((m for m in msgs if "status" in m), None)
    if done is None:
        if limit is None:
            raise SandboxError(f"sandbox: the launcher died: {err.text(2000)[0]}")
        return _result(out, err, cfg, -signal.SIGKILL, limit, seconds)
    returncode = os.waitstatus_to_exitcode(done["status"])
    if limit is None:
        limit = _limit_hit(returncode, done, err, cfg)
    return _result(out, err, cfg, returncode, limit, seconds)


_ALLOC_FAILURES = ("MemoryError", "Cannot allocate memory", "std::bad_alloc", "out of memory")


def _limit_hit(returncode: int, done: dict, err: _Capture, cfg: SandboxConfig) -> LimitKind | None:
    """Which rlimit most likely ended a command that exited by itself (a shell reports a killed
    child as 128 + signal and a message; Python ignores SIGXFSZ and gets EFBIG instead)."""
    tail = bytes(err.head[-4000:] + err.tail[-4000:]).decode("utf-8", "replace") if returncode else ""
    if returncode in (-signal.SIGXCPU, 128 + signal.SIGXCPU) or "CPU time limit exceeded" in tail:
        return "cpu"
    if returncode == -signal.SIGKILL and done["cpu_s"] >= cfg.cpu_s:
        return "cpu"
    if returncode in (-signal.SIGXFSZ, 128 + signal.SIGXFSZ) or "File size limit exceeded" in tail:
        return "file_size"
    if "File too large" in tail:
        return "file_size"
    if any(s in tail for s in _ALLOC_FAILURES):
        return "memory"
    return None


# ---------------------------------------------------------------------------------------------
# Worktrees


def _fresh_uid() -> int:
    """An uid no process uses now, far above the real accounts."""
    rng = random.SystemRandom()
    in_use = set()
    if os.path.isdir("/proc"):
        with os.scandir("/proc") as it:
            for e in it:
                if e.name.isdigit():
                    try:
                        in_use.add(e.stat().st_uid)
                    except FileNotFoundError:  # the process exited while we looked
                        pass
    while (uid := rng.randrange(*_UID_RANGE)) in in_use:
        pass
    return uid


def _chown_tree(path: Path, uid: int, gid: int) -> None:
    os.lchown(path, uid, gid)
    for dirpath, dirnames, filenames in os.walk(path):  # symlinks are chowned, never followed
        for name in dirnames + filenames:
            os.lchown(os.path.join(dirpath, name), uid, gid)


def give_to_sandbox(path: str | Path, uid: int | None = None) -> int:
    """Give the tree at `path` to sandbox uid `uid` (default: a fresh one), as root, so that run()
    may write it; returns the uid (the caller's own, and nothing changes, when not root)."""
    if os.geteuid() != 0:
        return os.getuid()
    uid = _fresh_uid() if uid is None else uid
    _chown_tree(Path(path), uid, uid)
    return uid


def safe_path(root: str | Path, rel: str | Path) -> Path:
    """`root/rel` with every symlink resolved, or a SandboxError when that leaves `root`: code
    outside the sandbox reading or writing a worktree file must go through this (the model may
    have made `rel`, or a directory on the way, a symlink to /etc/shadow)."""
    base = Path(root).resolve()
    p = (base / rel).resolve()
    if not p.is_relative_to(base):
        raise SandboxError(f"sandbox: {rel} leads outside the worktree (to {p})")
    return p


def _git(*args: str, cwd: str | Path | None = None, env: dict[str, str] | None = None) -> str:
    """git as the caller, on repositories the model never wrote."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    base.update(
        GIT_TERMINAL_PROMPT="0",
        GIT_AUTHOR_NAME="turnstile",
        GIT_AUTHOR_EMAIL="turnstile@localhost",
        GIT_COMMITTER_NAME="turnstile",
        GIT_COMMITTER_EMAIL="turnstile@localhost",
        GIT_AUTHOR_DATE="2000-01-01T00:00:00Z",
        GIT_COMMITTER_DATE="2000-01-01T00:00:00Z",
    )
    base.update(env or {})
    proc = subprocess.run(["git", *args], cwd=cwd, env=base, capture_output=True, text=True)
    if proc.returncode:
        raise SandboxError(f"git {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout.strip()


@contextlib.contextmanager
def _repo_lock(common_dir: Path):
    """One `git worktree add/prune` at a time on a repository, across processes."""
    with open(common_dir / "turnstile-worktree.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class Worktree:
    """A private copy of a repository at one commit, in a temp dir, owned by a fresh sandbox uid.

    mode="copy" (the default): the tree at `commit` in a new repository whose only commit is that
    tree ("base"): the model can use git freely, and no other commit (the fix, or the parent of an
    injected bug) is there to be read. mode="worktree": `git worktree add --detach`, cheaper, but
    the whole history is readable and the repository's git metadata is read-only to the sandbox
    (git add/commit fail). Either way the parent keeps a git directory the model cannot write
    (`git_dir`), which `diff()` reads. Safe to create and remove concurrently."""

    def __init__(self, path: Path, base: str, uid: int, git_dir: Path, readonly: list[Path], *, repo, scratch, mode):
        self.path, self.base, self.uid, self.git_dir, self.readonly = path, base, uid, git_dir, readonly
        self.repo, self.mode, self._scratch = repo, mode, scratch

    @classmethod
    def create(
        cls,
        repo: str | Path,
        commit: str = "HEAD",
        *,
        mode: Literal["copy", "worktree"] = "copy",
        parent: str | Path | None = None,
    ) -> Worktree:
        repo = Path(repo).resolve()
        sha = _git("rev-parse", "--verify", f"{commit}^{{commit}}", cwd=repo)
        scratch = Path(tempfile.mkdtemp(prefix="turnstile-wt-", dir=parent)).resolve()
        os.chmod(scratch, 0o711)  # the sandbox uid may pass through, to its worktree only
        path = scratch / "repo"
        try:
            if mode == "copy":
                path.mkdir()
                index = {"GIT_INDEX_FILE": str(scratch / "seed.index")}
                _git("--work-tree", str(path), "read-tree", sha, cwd=repo, env=index)
                _git("--work-tree", str(path), "checkout-index", "--all", "--force", cwd=repo, env=index)
                (scratch / "seed.index").unlink()
                _git("init", "--quiet", "--template=", "--initial-branch=main", str(path))
                _git("add", "--all", "--force", cwd=path)
                _git("-c", "commit.gpgsign=false", "commit", "--quiet", "--no-verify", "-m", "base", cwd=path)
                base = _git("rev-parse", "HEAD", cwd=path)
                git_dir = scratch / "base.git"
                shutil.copytree(path / ".git", git_dir, symlinks=True)
                readonly = [git_dir]
            elif mode == "worktree":
                common = Path(_git("rev-parse", "--path-format=absolute", "--git-common-dir", cwd=repo))
                with _repo_lock(common):
                    _git("worktree", "add", "--detach", "--quiet", str(path), sha, cwd=repo)
                # Read now, before the model could rewrite path/.git.
                git_dir = Path((path / ".git").read_text().split("gitdir:", 1)[1].strip()).resolve()
                base, readonly = sha, [common]
            else:
                raise SandboxError(f"Worktree mode must be copy or worktree, not {mode!r}")
            uid = _fresh_uid() if os.geteuid() == 0 else os.getuid()
            if os.geteuid() == 0:
                _chown_tree(path, uid, uid)
        except BaseException:
            cls._cleanup(scratch, repo if mode == "worktree" else None)
            raise
        return cls(path, base, uid, git_dir, readonly, repo=repo, scratch=scratch, mode=mode)

    def run(
        self,
        cmd: list[str] | str,
        cfg: SandboxConfig,
        stdin: str | None = None,
        *,
        cwd: str | Path | None = None,
        readonly: Sequence[str | Path] = (),
        writable: Sequence[str | Path] = (),
    ) -> RunResult:
        """run() in this worktree (`cwd` relative to it, default its top); `readonly` and
        `writable` as for run() (writable dirs must be `give_to_sandbox(d, uid=self.uid)`'s)."""
        where = safe_path(self.path, cwd) if cwd is not None else self.path
        ro = [*self.readonly, *readonly]
        return run(cmd, where, cfg, stdin, root=self.path, readonly=ro, writable=writable)

    def diff(self, cfg: SandboxConfig | None = None) -> str:
        """Every change since `base` (new files too, .gitignore'd ones not) as a `git apply`-able
        patch. git runs inside the sandbox, on a temporary index and object store, against the
        parent's git directory mounted read-only: nothing the model planted is interpreted
        outside the sandbox."""
        cfg = cfg or SandboxConfig()
        objects = self.git_dir / "objects" if self.mode == "copy" else Path(self.readonly[0]) / "objects"
        env = {
            **cfg.env,
            "GIT_DIR": str(self.git_dir),
            "GIT_WORK_TREE": str(self.path),
            "GIT_ALTERNATE_OBJECT_DIRECTORIES": str(objects),
        }
        big = max(cfg.max_output_mb, 256)
        cfg = cfg.model_copy(update={"env": env, "output_chars": big << 20, "max_output_mb": big})
        script = (
            'set -e; export GIT_INDEX_FILE="$TMPDIR/diff.index" GIT_OBJECT_DIRECTORY="$TMPDIR/diff.objects"; '
            'mkdir -p "$GIT_OBJECT_DIRECTORY"; git read-tree "$0"; git add --all; '
            'git -c core.quotepath=false diff --cached --binary --no-color --no-ext-diff --no-textconv "$0"'
        )
        res = run(["bash", "-c", script, self.base], self.path, cfg, root=self.path, readonly=self.readonly)
        if res.returncode != 0 or res.truncated:
            raise SandboxError(f"sandbox: git diff failed ({res.returncode}): {res.stderr[-2000:]}")
        return res.stdout

    def remove(self) -> None:
        """Delete the worktree (and prune it from the repository in worktree mode). Idempotent."""
        self._cleanup(self._scratch, self.repo if self.mode == "worktree" else None)

    @staticmethod
    def _cleanup(scratch: Path, repo: Path | None) -> None:
        # rmtree never follows the model's symlinks; git never looks inside the worktree.
        shutil.rmtree(scratch, ignore_errors=True)
        if repo is not None:
            common = Path(_git("rev-parse", "--path-format=absolute", "--git-common-dir", cwd=repo))
            with _repo_lock(common):
                _git("worktree", "prune", cwd=repo)

    def __enter__(self) -> Worktree:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"Worktree({str(self.path)!r}, base={self.base[:12]}, uid={self.uid}, mode={self.mode})"


# ---------------------------------------------------------------------------------------------
# Docker


def docker_missing() -> str | None:
    """None when docker can run containers here, else what is missing."""
    exe = shutil.which("docker")
    if exe is None:
        return "the docker CLI is not installed (no `docker` on PATH)"
    try:
        info = [exe, "info", "--format", "{{.ServerVersion}}"]
        proc = subprocess.run(info, capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer within 20 s"
    if proc.returncode != 0 or not proc.stdout.strip():
        why = (proc.stderr or proc.stdout).strip().splitlines()
        return f"the docker daemon is not reachable ({why[-1] if why else 'docker info failed'})"
    return None


def _require_docker() -> None:
    if (missing := docker_missing()) is not None:
        raise SandboxError(f"env.sandbox: docker needs a working docker: {missing}; use env.sandbox: local")


def docker_run_argv(image: str, cfg: SandboxConfig, name: str, *, workdir: str = "/testbed") -> list[str]:
    """`docker run` for an episode's container: the limits of `cfg` as docker flags; it idles
    until `docker exec` runs the commands."""
    mem = f"{cfg.memory_mb}m"
    return [
        "docker", "run", "--detach", "--rm", "--name", name,
        "--network", "bridge" if cfg.network else "none",
        "--memory", mem, "--memory-swap", mem,
        "--pids-limit", str(cfg.max_procs),
        "--cpus", str(cfg.docker_cpus),
        "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
        "--ulimit", f"nofile={cfg.open_files}:{cfg.open_files}",
        "--ulimit", f"fsize={cfg.file_mb << 20}:{cfg.file_mb << 20}",
        "--ulimit", "core=0:0",
        "--tmpfs", f"/tmp:size={cfg.tmp_mb}m",
        "--workdir", workdir,
        "--entrypoint", "sleep",
        image, "infinity",
    ]  # fmt: skip


def docker_exec_argv(name: str, cmd: list[str] | str, cfg: SandboxConfig, *, cwd: str = "/testbed") -> list[str]:
    """`docker exec` of one command: the environment scrubbed to PATH/HOME/cfg.env, the timeout
    and per-process rlimits inside the container (coreutils `timeout`, util-linux `prlimit`)."""
    env = {"HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", **cfg.env}
    env_flags = [flag for k, v in env.items() for flag in ("--env", f"{k}={v}")]
    argv = ["bash", "-c", cmd] if isinstance(cmd, str) else [str(c) for c in cmd]
    limits = [f"--cpu={cfg.cpu_s}:{cfg.cpu_s + 1}", f"--as={cfg.memory_mb << 20}", f"--nproc={cfg.max_procs}"]
    limits += [f"--fsize={cfg.file_mb << 20}", f"--nofile={cfg.open_files}", "--core=0"]
    timeout = ["timeout", "--signal=KILL", f"{cfg.timeout_s:g}"]
    head = ["docker", "exec", "--interactive", "--workdir", cwd, *env_flags, name]
    return [*head, *timeout, "prlimit", *limits, "--", *argv]


class Container:
    """An episode's container from a per-instance image (`env.sandbox: docker`)."""

    def __init__(self, name: str, cfg: SandboxConfig, workdir: str):
        self.name, self.cfg, self.workdir = name, cfg, workdir

    @classmethod
    def start(cls, image: str, cfg: SandboxConfig, *, name: str | None = None, workdir: str = "/testbed") -> Container:
        _require_docker()
        name = name or f"turnstile-{os.getpid()}-{random.SystemRandom().randrange(1 << 32):08x}"
        proc = subprocess.run(docker_run_argv(image, cfg, name, workdir=workdir), capture_output=True, text=True)
        if proc.returncode != 0:
            raise SandboxError(f"docker run {image}: {proc.stderr.strip()}")
        return cls(name, cfg, workdir)

    def run(self, cmd: list[str] | str, cfg: SandboxConfig | None = None, stdin: str | None = None, *, cwd=None):
        return run(cmd, cwd or self.workdir, cfg or self.cfg, stdin, container=self.name)

    def remove(self) -> None:
        subprocess.run(["docker", "rm", "--force", self.name], capture_output=True)

    def __enter__(self) -> Container:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _run_docker(cmd: list[str] | str, cwd: str, cfg: SandboxConfig, stdin: str | None, container: str) -> RunResult:
    _require_docker()
    argv = docker_exec_argv(container, cmd, cfg, cwd=cwd)
    with tempfile.TemporaryFile() as stdin_file:
        stdin_file.write((stdin or "").encode())
        stdin_file.seek(0)
        start = time.monotonic()
        proc = subprocess.Popen(
            argv, stdin=stdin_file, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
        )
        with proc:
            # `timeout` inside ends the command; the extra seconds are for docker itself.
            out, err, _, limit = _pump(proc, cfg, None, start + cfg.timeout_s + 10)
    if limit is not None:  # the command may outlive its docker client: end the container
        subprocess.run(["docker", "kill", container], capture_output=True)
    rc = proc.returncode
    if limit is None and rc == 137 and time.monotonic() - start >= cfg.timeout_s:
        limit = "timeout"
    return _result(out, err, cfg, rc, limit, time.monotonic() - start)


__all__ = [
    "Container",
    "RunResult",
    "SandboxConfig",
    "SandboxError",
    "Worktree",
    "docker_exec_argv",
    "docker_missing",
    "docker_run_argv",
    "give_to_sandbox",
    "isolation_report",
    "run",
    "safe_path",
]
