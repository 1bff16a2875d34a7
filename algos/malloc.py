"""mimalloc for the training processes: imported before torch, standard library only.

launch.py (and long-running bench scripts) call `rerun_with_mimalloc()` first thing: the process
replaces itself by the same command with mimalloc preloaded (Ray's workers inherit it).
"""
from __future__ import annotations

import os
import sys


def mimalloc_env(environ: dict[str, str]) -> dict[str, str] | None:
    """The environment to re-run this command in with mimalloc preloaded, or None to run as is.

    With glibc's malloc, bf16-autocast CPU training on batches of varying length kept memory it
    had freed: a TextWorld SFT grew ~200 MB a minute (8 GB by the end), a 150-step probe from 0.7
    to 4.3 GB. mimalloc (the `cmeel-mimalloc` wheel, Linux x86-64) reuses it: the probe ends at
    1.7 GB and steps are no slower (docs/textworld.md). Ray's workers inherit the preload.
    `TURNSTILE_MALLOC=system` keeps glibc's malloc."""
    if sys.platform != "linux" or environ.get("TURNSTILE_MALLOC", "mimalloc") != "mimalloc":
        return None
    preload = environ.get("LD_PRELOAD", "")
    if any(lib in preload for lib in ("libmimalloc", "libjemalloc", "libtcmalloc")):
        return None  # the re-run, or the user preloads an allocator of their own (as vLLM-CPU's docs advise)
    try:
        from importlib.metadata import PackageNotFoundError, distribution

        lib = distribution("cmeel-mimalloc").locate_file("cmeel.prefix/lib/libmimalloc.so")
    except PackageNotFoundError:
        return None
    if not os.path.exists(lib):
        return None
    return {**environ, "LD_PRELOAD": f"{lib}:{preload}" if preload else str(lib)}


def rerun_with_mimalloc() -> None:
    """Replace this process by the same command with mimalloc preloaded, when `mimalloc_env` says so."""
    env = mimalloc_env(dict(os.environ))
    if env is not None:
        sys.stdout.flush()
        os.execve(sys.executable, sys.orig_argv, env)  # does not return
