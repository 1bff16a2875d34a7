"""The `swe` env's tools, run against an episode's worktree (the syntax is in format.py).

Every file the env reads or writes itself goes through sandbox.safe_path (the model may have
made any path a symlink out of the tree) and must be a regular file; every command (search,
run_tests, bash) runs in the sandbox. A tool the model misuses (a missing file, text not found)
raises ToolError, whose message is the reply; a sandbox that breaks raises SandboxError (an
infra error for the env).
"""

from __future__ import annotations

import shutil
import stat
import tempfile
from pathlib import Path

from .format import Call
from .instances import TestRun, instance_pythonpath, plugin_dir, run_pytest
from .sandbox import SandboxConfig, SandboxError, Worktree, give_to_sandbox, safe_path

MAX_FILE_BYTES = 1 << 20
# What of run_pytest's environment goes into the sandbox (never the parent's whole environment).
PYTEST_VARS = ("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "PYTHONDONTWRITEBYTECODE", "PYTHONHASHSEED", "PYTHONPATH",
               "OMP_NUM_THREADS", "PYTHONIOENCODING")


class ToolError(ValueError):
    """The model misused a tool; the message is the env's reply."""


def clip(text: str, limit: int) -> str:
    """text cut to `limit` characters, keeping the head and the tail."""
    if len(text) <= limit:
        return text
    half = (limit - 40) // 2
    return f"{text[:half]}\n[... {len(text) - 2 * half} characters cut ...]\n{text[-half:]}"


def resolve(wt: Worktree, rel: str) -> Path:
    if rel.startswith("/"):
        rel = rel.lstrip("/")
    try:
        return safe_path(wt.path, rel)
    except SandboxError:
        raise ToolError(f"{rel}: outside the repository") from None


def read_text(wt: Worktree, rel: str) -> tuple[Path, str]:
    p = resolve(wt, rel)
    try:
        st = p.stat()
    except OSError:
        raise ToolError(f"{rel}: no such file") from None
    if not stat.S_ISREG(st.st_mode):
        raise ToolError(f"{rel}: not a file")
    if st.st_size > MAX_FILE_BYTES:
        raise ToolError(f"{rel}: too large ({st.st_size} bytes)")
    try:
        return p, p.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ToolError(f"{rel}: not a UTF-8 text file") from None


def write_text(wt: Worktree, rel: str, text: str) -> None:
    """Rewrite an existing regular file of the worktree (it keeps its owner, the sandbox uid)."""
    p = resolve(wt, rel)
    if not p.is_file():
        raise ToolError(f"{rel}: no such file")
    with open(p, "r+b") as f:
        f.truncate(0)
        f.write(text.encode("utf-8"))


def numbered(lines: list[str], first: int) -> str:
    return "\n".join(f"{first + i:4d} {line}" for i, line in enumerate(lines))


def snippet(text: str, line: int, count: int, context: int = 3) -> str:
    """Lines around [line, line + count) of text (1-based), numbered."""
    lines = text.split("\n")
    lo = max(1, line - context)
    hi = min(len(lines), line + max(count, 1) - 1 + context)
    return numbered(lines[lo - 1: hi], lo)


def sandboxed_runner(wt: Worktree, cfg: SandboxConfig, scratch: Path):
    """A run_pytest runner: pytest inside the sandbox of `wt`, with only the variables it needs."""
    plugins = plugin_dir()
    plugins.chmod(0o755)  # the sandbox uid reads it
    for f in plugins.iterdir():
        f.chmod(0o644)

    def go(cmd, cwd, timeout, env):
        keep = {k: env[k] for k in PYTEST_VARS if k in env}
        run_cfg = cfg.model_copy(update={"timeout_s": timeout, "cpu_s": max(cfg.cpu_s, int(timeout) + 1),
                                         "env": {**cfg.env, **keep}})
        return wt.run(cmd, run_cfg, readonly=[plugins], writable=[scratch])

    return go


def run_tests(wt: Worktree, instance: dict, cfg: SandboxConfig, timeout: float, tests=None, paths=()) -> TestRun:
    """pytest in the worktree's sandbox: `tests` (ids) or everything under `paths`."""
    scratch = Path(tempfile.mkdtemp(prefix="turnstile-swe-tests-"))
    try:
        scratch.chmod(0o755)
        give_to_sandbox(scratch, uid=wt.uid)
        return run_pytest(wt.path, tests, paths=paths, timeout=timeout, pythonpath=instance_pythonpath(instance),
                          scratch=scratch, runner=sandboxed_runner(wt, cfg, scratch), memory_mb=None)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def report(run: TestRun, limit: int) -> str:
    """A test run as the model reads it: a verdict per test, then the failures' short tracebacks."""
    if run.timed_out:
        return f"the tests timed out after {run.seconds:.0f} s\n" + clip(run.output, limit // 2)
    counts: dict[str, int] = {}
    for outcome in run.outcomes.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    lines = [", ".join(f"{n} {o}" for o, n in sorted(counts.items())) or "no tests ran"]
    lines += [f"{o.upper()} {t}" for t, o in run.outcomes.items() if o != "passed"]
    for err in run.collect_errors:
        lines.append(f"ERROR collecting {err['nodeid']}:\n{err['text'][-1500:]}")
    for t, text in run.texts.items():
        lines.append(f"--- {t}\n{text.strip()}")
    if not run.outcomes and not run.collect_errors:
        lines.append(run.output.strip())
    return clip("\n".join(lines), limit)


class Tools:
    """The tools of one episode on its worktree; `history` holds each file's texts before its edits."""

    def __init__(self, wt: Worktree, instance: dict, config) -> None:
        self.wt, self.instance, self.config = wt, instance, config
        self.history: dict[str, list[str]] = {}
        self.cmd_cfg = config.sandbox.model_copy(update={"timeout_s": config.tool_timeout_s,
                                                         "output_chars": config.output_chars})

    def __call__(self, call: Call) -> str:
        return getattr(self, "tool_" + call.tool)(call)

    def _key(self, rel: str) -> str:
        return str(resolve(self.wt, rel).relative_to(self.wt.path.resolve()))

    def tool_view(self, call: Call) -> str:
        rel = call.args[0]
        p = resolve(self.wt, rel)
        if p.is_dir():
            entries = sorted(e.name + ("/" if e.is_dir() else "") for e in p.iterdir() if e.name != ".git")
            return clip(f"{rel}/\n" + "\n".join(entries), self.config.output_chars)
        _, text = read_text(self.wt, rel)
        lines = text.split("\n")
        if text.endswith("\n"):
            lines.pop()
        if len(call.args) == 3:
            start, end = int(call.args[1]), int(call.args[2])
            if start < 1 or end < start:
                raise ToolError(f"view: bad range {start}..{end} (lines are 1..{len(lines)})")
        else:
            start, end = 1, self.config.view_lines
        end = min(end, len(lines))
        if start > len(lines):
            raise ToolError(f"view: {rel} has {len(lines)} lines")
        body = numbered(lines[start - 1: end], start)
        return clip(f"{rel} (lines {start}-{end} of {len(lines)})\n{body}", self.config.output_chars)

    def tool_search(self, call: Call) -> str:
        pattern, where = call.args[0], call.args[1] if len(call.args) > 1 else "."
        resolve(self.wt, where)
        argv = ["grep", "-rnI", "--exclude-dir=.git", "-e", pattern, "--", where]
        res = self.wt.run(argv, self.cmd_cfg)
        if res.timed_out:
            return "search timed out"
        if res.returncode == 1:
            return f"no match for {pattern!r}"
        if res.returncode != 0:
            return clip(res.stderr.strip() or f"grep failed ({res.returncode})", self.config.output_chars)
        lines = res.stdout.splitlines()
        more = len(lines) - self.config.max_matches
        out = "\n".join(lines[: self.config.max_matches]) + (f"\n[{more} more matches]" if more > 0 else "")
        return clip(out, self.config.output_chars)

    def tool_str_replace(self, call: Call) -> str:
        rel = call.args[0]
        _, text = read_text(self.wt, rel)
        old, new = call.body or "", call.new or ""
        n = text.count(old)
        if n == 0:
            raise ToolError(f"str_replace: the old lines do not occur in {rel} (copy them exactly, "
                            "without the line numbers view shows)")
        if n > 1:
            raise ToolError(f"str_replace: the old lines occur {n} times in {rel}; add lines around them")
        at = text.index(old)
        if not new and at + len(old) < len(text) and text[at + len(old)] == "\n":
            old += "\n"  # deleting whole lines takes their line break too
        updated = text[:at] + new + text[at + len(old):]
        write_text(self.wt, rel, updated)
        self.history.setdefault(self._key(rel), []).append(text)
        line = text[:at].count("\n") + 1
        return f"edited {rel}:\n" + snippet(updated, line, new.count("\n") + 1)

    def tool_insert(self, call: Call) -> str:
        rel, after = call.args[0], int(call.args[1])
        _, text = read_text(self.wt, rel)
        lines = text.split("\n")
        trailing = text.endswith("\n")
        if trailing:
            lines.pop()
        if after > len(lines):
            raise ToolError(f"insert: {rel} has {len(lines)} lines")
        new_lines = (call.body or "").split("\n")
        updated = "\n".join(lines[:after] + new_lines + lines[after:]) + ("\n" if trailing or not lines else "")
        write_text(self.wt, rel, updated)
        self.history.setdefault(self._key(rel), []).append(text)
        return f"edited {rel}:\n" + snippet(updated, after + 1, len(new_lines))

    def tool_undo_edit(self, call: Call) -> str:
        rel = call.args[0]
        stack = self.history.get(self._key(rel))
        if not stack:
            raise ToolError(f"undo_edit: no edit of {rel} to undo")
        write_text(self.wt, rel, stack.pop())
        return f"undid the last edit of {rel}"

    def tool_run_tests(self, call: Call) -> str:
        for a in call.args:
            resolve(self.wt, a.split("::", 1)[0])
        if call.args:
            run = run_tests(self.wt, self.instance, self.config.sandbox, self.config.tool_timeout_s, paths=call.args)
        else:
            tests = list(self.instance["FAIL_TO_PASS"]) + list(self.instance["PASS_TO_PASS"])
            run = run_tests(self.wt, self.instance, self.config.sandbox, self.config.tool_timeout_s, tests=tests)
        return report(run, self.config.output_chars)

    def tool_bash(self, call: Call) -> str:
        res = self.wt.run(call.body or "", self.cmd_cfg)
        head = f"(timed out after {self.config.tool_timeout_s:g} s)" if res.timed_out else f"(exit {res.returncode})"
        out = "\n".join(x for x in (res.stdout.rstrip(), res.stderr.rstrip()) if x)
        return clip(f"{head}\n{out}" if out else head, self.config.output_chars)
