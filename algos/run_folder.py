"""One run per run folder, and a run folder's storage failures as errors a user can act on.

    with claim_run_folder(exp.out_dir):   # created if missing; RunFolderError if another run holds it
        ...                               # everything this job writes under out_dir

A job takes an exclusive lock (flock on `<folder>/.lock`, which records its PID, host and start time)
before it writes anything there: two runs started into one folder would interleave their metrics
rows and overwrite (or delete) each other's checkpoints. The kernel drops the lock when its process
dies, however it dies, so a killed run's lock is taken over by the next run, which says so. Nested
claims of one folder by one process (train → its RL stage) are reentrant. flock is per machine:
on a cluster, keep run folders of concurrent jobs apart yourself (ranks never claim; the driver does).
"""
from __future__ import annotations

import errno
import fcntl
import functools
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = ".lock"

# errno of a storage failure a user fixes outside the program: a full disk or quota, a read-only
# or unwritable folder, a path through a file
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR,
                  errno.EFBIG}
NEARLY_FULL = 64 * 2**20  # bytes free under which a failed write is blamed on the disk


class RunFolderError(RuntimeError):
    """A run folder that cannot be used: held by another run, unwritable, or out of space."""


_held: dict[Path, list] = {}  # resolved folder -> [lock file, claims by this process]


def _free_bytes(path: Path) -> int | None:
    for p in (path, *path.parents):  # the nearest folder that exists holds the file system
        if p.exists():
            try:
                return shutil.disk_usage(p).free
            except OSError:
                return None
    return None


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n < 2**30 else f"{n / 2**30:.1f} GB"


def storage_error(error: BaseException, path: str | Path, doing: str) -> RunFolderError:
    """A RunFolderError saying what ran out or refused, and where, for `error` raised while `doing`
    (e.g. 'writing checkpoint step_0000200') under `path`. torch's zip writer reports a full disk
    as `RuntimeError: [enforce fail at inline_container.cc:...] . unexpected pos ...`: any write
    error with the disk (nearly) full is called what it is."""
    path = Path(path)
    code = getattr(error, "errno", None)
    free = _free_bytes(path)
    nearly_full = free is not None and free < NEARLY_FULL
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or (code is None and nearly_full):
        what = {errno.EDQUOT: "disk quota exceeded", errno.EFBIG: "file size limit reached"}.get(code, "no space left")
        left = f"; {_size(free)} free there" if free is not None else ""
        return RunFolderError(f"{what} on the device holding {path} while {doing}{left}. Free some space (or set "
                              "out_dir to a folder on a larger disk) and rerun with --resume: the previous "
                              "complete checkpoint is kept")
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        where = getattr(error, "filename", None) or path
        return RunFolderError(f"cannot write {where} while {doing}: {os.strerror(code)}. Point out_dir at a "
                              "folder this user can write")
    if code in (errno.ENOTDIR, errno.EEXIST):
        return RunFolderError(f"cannot create {path} while {doing}: a part of that path is a file, not a folder")
    return RunFolderError(f"{doing} under {path} failed: {type(error).__name__}: {error}")


@contextmanager
def claim_run_folder(folder: str | Path) -> Iterator[Path]:
    """Create `folder` if needed and hold its lock for the block (see the module docstring)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        key = folder.resolve()
        if key in _held:  # this process holds it already: a nested stage of the same job
            _held[key][1] += 1
            try:
                yield folder
            finally:
                _held[key][1] -= 1
            return
        lock = open(folder / LOCK_FILE, "a+")
    except OSError as e:
        raise storage_error(e, folder, "creating the run folder") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "a process that has not written its PID yet"
        lock.close()
        raise RunFolderError(f"{folder} is in use by another run ({holder}): two runs writing one folder mix their "
                             "logs and checkpoints. Wait for it or stop it, or set out_dir to another folder") from None
    lock.seek(0)
    previous = lock.read().strip()
    if previous:  # its process is gone (else the flock above had failed): a killed run
        print(f"{folder}: taking over the lock of a run that ended without releasing it ({previous})", flush=True)
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    lock.flush()
    _held[key] = [lock, 1]
    try:
        yield folder
    finally:
        del _held[key]
        try:  # emptied, not removed: a removed lock file could be locked anew while a waiter holds the old one
            lock.seek(0)
            lock.truncate()
        except OSError:
            pass
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()


def holds_run_folder(job):
    """Decorator of a job `job(exp, ...)`: it runs holding the lock of its run folder, exp.out_dir."""

    @functools.wraps(job)
    def run(exp, *args, **kwargs):
        with claim_run_folder(exp.out_dir):
            return job(exp, *args, **kwargs)

    return run
