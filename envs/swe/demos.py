"""Expert demonstrations for SFT: a scripted expert, played in the env, with detour demos.

The expert runs the tests, reads the failures, views the code the instance's `patch` changes,
fixes it with one str_replace per hunk (the old lines of the hunk, trimmed to the fewest that
occur once in the file), runs the tests again and submits. A demonstration is multi-turn:
{"turns": [{"observation", "action", "expert"?}], "final_observation", "won", "reward", "task"},
the observations exactly what the env showed and the actions the calls' text (format.call_text),
which ToolFormat.segments reads. Only demos the env grades resolved are kept.

Detours (`mistakes` > 0): in that fraction of the demos the first edit is a wrong one (the buggy
line with one operator or constant changed, else a comment added), marked {"expert": False} and
not trained on; the expert then runs the tests, sees them fail, undoes the edit and goes on.

Recoveries (`recoveries` > 0): in that fraction the first str_replace quotes old lines that do
not occur in the file (one line slightly changed; not trained on), gets the env's error reply,
views the code again and makes the right edit. Without them no demo shows an error reply, and a
policy that meets one (a misquoted edit, a bad view range) has nothing to imitate: measured on
the real instances, the SFT policy then wrote empty calls until out of turns (docs/swe.md).
"""

from __future__ import annotations

import random
import re
from typing import Iterator

from pydantic import Field

from ..base import DemoOptions
from .env import SweEnv
from .format import call_text

_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")
# Small wrong edits of a line (the first that applies and changes the line).
_WRONG = [(" + ", " - "), (" - ", " + "), (" < ", " <= "), (" <= ", " < "), (" > ", " >= "), (" >= ", " > "),
          (" == ", " != "), (" != ", " == "), ("True", "False"), ("False", "True"), (" 1", " 2"), (" 0", " 1")]


class SweDemoOptions(DemoOptions):
    """`sft.demos` keys of the swe env."""

    mistakes: float = Field(0.0, ge=0, le=1, description="fraction of demos whose first edit is a wrong one")
    recoveries: float = Field(0.0, ge=0, le=1, description="fraction of demos whose first str_replace misquotes "
                              "the old lines, gets the error reply, views again and edits right")


def hunks(patch: str) -> list[dict]:
    """Each change of a unified diff (a run of -/+ lines, with the hunk's context lines around it
    up to the next change): its path, the source line its old lines start at, its old and new lines."""
    out: list[dict] = []
    path, hunk = None, None
    raw: list[tuple[str, list[tuple[str, str]]]] = []
    for line in patch.splitlines():
        if line.startswith("+++ "):
            path = line[4:].removeprefix("b/")
        elif line.startswith("--- "):
            continue
        elif (m := _HUNK.match(line)) is not None:
            hunk = (path, int(m.group(1)), [])
            raw.append(hunk)
        elif hunk is not None and (line[:1] in (" ", "-", "+") or line == ""):
            hunk[2].append((line[:1] or " ", line[1:]))
    for path, start, lines in raw:
        changed = [i for i, (tag, _) in enumerate(lines) if tag != " "]
        blocks: list[list[int]] = []
        for i in changed:
            if blocks and i == blocks[-1][-1] + 1:
                blocks[-1].append(i)
            else:
                blocks.append([i])
        for k in range(len(blocks)):
            lo = blocks[k - 1][-1] + 1 if k else 0
            hi = blocks[k + 1][0] if k + 1 < len(blocks) else len(lines)
            part = lines[lo:hi]
            first = start + sum(tag != "+" for tag, _ in lines[:lo])
            out.append({"path": path, "start": first, "old": [t for tag, t in part if tag != "+"],
                        "new": [t for tag, t in part if tag != "-"]})
    return out


def minimal_edit(text: str, old: list[str], new: list[str]) -> tuple[str, str]:
    """(old, new) texts of the edit, with the hunk's context trimmed to the least that makes the
    old text occur once in `text`."""
    p = 0
    while p < min(len(old), len(new)) and old[p] == new[p]:
        p += 1
    s = 0
    while s < min(len(old), len(new)) - p and old[-1 - s] == new[-1 - s]:
        s += 1
    for k in range(max(p, s) + 1):
        a, b = p - min(k, p), s - min(k, s)
        o, n = old[a: len(old) - b], new[a: len(new) - b]
        if "".join(o).strip() and text.count("\n".join(o)) == 1:
            return "\n".join(o), "\n".join(n)
    return "\n".join(old), "\n".join(new)


def view_ranges(plan: list[dict], margin: int = 2, span: int = 80) -> list[tuple[str, int, int]]:
    """The (path, first, last) line ranges that show every change, nearby changes in one view."""
    out: list[list] = []
    for h in plan:
        lo, hi = max(1, h["start"] - margin), h["start"] + len(h["old"]) + margin
        if out and out[-1][0] == h["path"] and hi - out[-1][1] <= span:
            out[-1][2] = max(out[-1][2], hi)
        else:
            out.append([h["path"], lo, hi])
    return [tuple(r) for r in out]


def wrong_line(line: str, fixed: set[str] = frozenset()) -> str:
    """The line with one small change that is not the fix (a line in `fixed`), else a comment added."""
    for a, b in _WRONG:
        if a in line and (cand := line.replace(a, b, 1)) not in fixed:
            return cand
    return line + "  # fixed"


def misquote(old: str, text: str) -> str | None:
    """`old` with its first changeable line slightly changed so that it no longer occurs in
    `text` (None when no such change exists)."""
    lines = old.split("\n")
    for i, line in enumerate(lines):
        for cand in (wrong_line(line), line.replace("    ", "  ", 1)):
            bad = "\n".join(lines[:i] + [cand] + lines[i + 1:])
            if cand != line and bad not in text:
                return bad
    return None


def demonstration(env: SweEnv, task: dict, detour: bool = False, recovery: bool = False) -> dict:
    """Play the scripted expert on `task` in `env` (a misquoted edit and its recovery, then a
    detour, first when asked)."""
    obs, _ = env.reset(options={"task": task})
    turns: list[dict] = []
    done, reward, info = False, 0.0, {}

    def act(text: str, expert: bool = True) -> str:
        nonlocal obs, done, reward, info
        turns.append({"observation": obs, "action": text, "expert": expert})
        obs, reward, terminated, truncated, info = env.step(text)
        done = terminated or truncated
        return obs

    try:
        act(call_text("run_tests"))
        plan = hunks(task["patch"])
        for path, lo, hi in view_ranges(plan):  # look at the code first
            if not done:
                act(call_text("view", path, lo, hi))
        detoured = False
        for h in plan:
            if done:
                break
            text = (env.wt.path / h["path"]).read_text()
            old, new = minimal_edit(text, h["old"], h["new"])
            if recovery and (misquoted := misquote(old, text)) is not None:
                recovery = False
                act(call_text("str_replace", h["path"], body=misquoted, new=new), expert=False)
                for path, lo, hi in view_ranges([h]):  # the error reply, then look again
                    if not done:
                        act(call_text("view", path, lo, hi))
            if detour and not detoured:
                detoured = True
                lines = old.split("\n")
                changed = next((i for i, ln in enumerate(lines) if ln not in h["new"]), 0)
                bad = lines[:changed] + [wrong_line(lines[changed], set(h["new"]))] + lines[changed + 1:]
                if "\n".join(bad) != new:
                    act(call_text("str_replace", h["path"], body=old, new="\n".join(bad)), expert=False)
                    if not done:
                        act(call_text("run_tests"))
                    if not done:
                        act(call_text("undo_edit", h["path"]))
            if not done:
                act(call_text("str_replace", h["path"], body=old, new=new))
        if not done:
            act(call_text("run_tests"))
        if not done:
            act(call_text("submit"))
    finally:
        env.close()
    return {"turns": turns, "final_observation": obs, "won": bool(info.get("won")), "reward": reward,
            "infra_error": info.get("infra_error") or False, "task": task, "instance_id": task["instance_id"]}


def task_demonstrations(source, split: str, n: int, seed: int = 0, start: int = 0, mistakes: float = 0.0,
                        recoveries: float = 0.0) -> Iterator[dict | None]:
    """The registered demonstration builder: the expert's demo of each of the tasks [start, n) of
    `split`, None where the env does not grade it resolved."""
    env = SweEnv(source.config)
    try:
        for task in source.tasks(split)[start:n]:
            rng = random.Random(f"swe-mistakes/{seed}/{task['instance_id']}")
            detour = bool(mistakes) and rng.random() < mistakes  # drawn first: the same detours as before
            recovery = bool(recoveries) and rng.random() < recoveries
            demo = demonstration(env, task, detour=detour, recovery=recovery)
            yield demo if demo["won"] else None
    finally:
        env.close()


def demo_stats(demos: list[dict]) -> dict:
    """Shares of demos with a detour (any call not trained on) and with an error reply, and their
    mean number of turns."""
    if not demos:
        return {}
    return {"detour_share": round(sum(any(not t.get("expert", True) for t in d["turns"]) for d in demos)
                                  / len(demos), 4),
            "error_share": round(sum(any(t["observation"].startswith("error:") for t in d["turns"][1:])
                                     for d in demos) / len(demos), 4),
            "mean_turns": round(sum(len(d["turns"]) for d in demos) / len(demos), 2)}


def eval_stats(records: list[dict]) -> dict:
    """Resolve rate and instances per repository (`success/<repo>`, `tasks/<repo>`: the eval's
    per-group table) and the tool-call mix (`tool_share/<tool>`); infra errors unscored."""
    wins: dict[str, int] = {}
    counts: dict[str, int] = {}
    for r in records:
        if r.get("infra_error"):
            continue
        repo = (r.get("task") or {}).get("repo") or "unknown"
        counts[repo] = counts.get(repo, 0) + 1
        wins[repo] = wins.get(repo, 0) + bool(r.get("won"))
    out: dict = {}
    for repo in sorted(counts):
        out[f"success/{repo}"] = wins[repo] / counts[repo]
        out[f"tasks/{repo}"] = counts[repo]
    # the tool-call mix: each tool's share of all calls of the scored episodes
    calls: dict[str, float] = {}
    for r in records:
        if not r.get("infra_error"):
            for key, n in (r.get("episode_stats") or {}).items():
                if key.startswith("calls/"):
                    calls[key[len("calls/"):]] = calls.get(key[len("calls/"):], 0) + n
    total = sum(calls.values())
    for tool in sorted(calls):
        out[f"tool_share/{tool}"] = calls[tool] / total
    return out
