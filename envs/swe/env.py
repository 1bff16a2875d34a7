"""The `swe` env: fix a bug in a repository with tools, graded by the instance's tests.

    env = envs.make("swe", instances_file="my.jsonl", repos_dir="repos", reward_density="dense")
    obs, info = env.reset(options={"task": envs.make_tasks("swe", ...).tasks("valid")[0]})
    obs, reward, terminated, truncated, info = env.step("run_tests\\n\\f")

reset() makes a private worktree of the instance's base_commit (sandbox.Worktree, copy mode: no
history to read the fix from); the observation is the issue text, then the tool list. Each step
is one tool call (format.py's syntax); a call that does not parse, or a tool misused, gets an
error reply and the episode goes on. `submit`, or the max_turns-th call, ends the episode and
grades it.

Grading (grade()): in a FRESH worktree of the base, the episode's diff (wt.diff()) is applied
with its changes to test files left out (the instance's test files, conftest.py, and any file
under a tests/ or test/ folder or named test_*.py / *_test.py), then the instance's test_patch;
FAIL_TO_PASS and PASS_TO_PASS are run in the sandbox. sparse: 1.0 only if every one passes.
dense: the fraction of FAIL_TO_PASS now passing, paid only while every PASS_TO_PASS still passes
(a no-op earns nothing). Both are paid on the last step alone. A grading run that times out, a
patch that does not apply or a sandbox that breaks is an infra error (info["infra_error"] is
the reason; the reward is 0 and the episode is not scored), never a 0 score.
info["reward_components"]: fail_to_pass (fraction passing), pass_to_pass_ok, resolved.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

from ..base import TRAIN_SPLIT, VALID_SPLIT, TaskSource, TextEnv, make_info
from .config import SweConfig
from .format import TOOLS_HELP, ParseError, parse_call
from .instances import InstanceError, files_of, find_repo, load_instances
from .sandbox import SandboxError, Worktree
from .tools import ToolError, Tools, clip, run_tests

HELDOUT = "heldout"
SPLITS = (TRAIN_SPLIT, VALID_SPLIT, HELDOUT)


# ---------------------------------------------------------------------------------------------
# Tasks


class SweTasks(TaskSource):
    """train / valid / heldout instances: the synthesized cache, or a user's file (config)."""

    def __init__(self, config: SweConfig):
        self.config = config
        if config.instances_file:
            if not config.repos_dir:
                raise InstanceError("env.instances_file needs env.repos_dir (where its repositories are)")
            self.repos_dir = Path(config.repos_dir)
            self._instances = [self._with_split(i) for i in load_instances(config.instances_file, self.repos_dir)]
        else:
            from .projects import pinned
            from .synth import open_synthetic  # heavy-ish: only when the cache is used

            # MissingDataError naming launch.py gen-data when these settings were never synthesized
            source = open_synthetic(config.cache_dir, pinned(config.projects), config.synth)
            self.repos_dir = source.repos_dir
            self._instances = [i for s in SPLITS for i in source.tasks(s)]
        for inst in self._instances:
            inst["repos_dir"] = str(self.repos_dir)

    @staticmethod
    def _with_split(inst: dict) -> dict:
        if inst.get("split") in SPLITS:
            return inst
        h = int(hashlib.sha256(inst["instance_id"].encode()).hexdigest()[:8], 16) / 16**8
        return {**inst, "split": TRAIN_SPLIT if h < 0.8 else VALID_SPLIT if h < 0.9 else HELDOUT}

    def splits(self) -> list[str]:
        return list(SPLITS)

    def tasks(self, split: str) -> list[dict]:
        self._check_split(split)
        return [json.loads(json.dumps(i)) for i in self._instances if i["split"] == split]

    def tasks_from_file(self, path: str) -> list[dict]:
        if not self.config.repos_dir:
            raise InstanceError(f"{path}: tasks from a file need env.repos_dir (where their repositories are)")
        return [{**i, "repos_dir": self.config.repos_dir} for i in load_instances(path, self.config.repos_dir)]

    def task_key(self, task: dict) -> str:
        return task["instance_id"]


# ---------------------------------------------------------------------------------------------
# Grading

_DIFF_HEAD = re.compile(r"^diff --git a/(.*?) b/(.*)$")


def is_test_file(path: str, test_files: set[str]) -> bool:
    """A file the grade's tests depend on, whose edits the grade leaves out."""
    parts = path.split("/")
    name = parts[-1]
    return (path in test_files or name == "conftest.py" or name.startswith("test_") or name.endswith("_test.py")
            or any(d in ("tests", "test", "testing") for d in parts[:-1]))


def split_diff(patch: str, test_files: set[str]) -> tuple[str, list[str]]:
    """The patch without its sections that touch test files, and those files."""
    sections: list[list[str]] = []
    for line in patch.splitlines(keepends=True):
        if line.startswith("diff --git ") or not sections:
            sections.append([])
        sections[-1].append(line)
    kept, dropped = [], []
    for sec in sections:
        m = _DIFF_HEAD.match(sec[0].rstrip("\n"))
        paths = {m.group(1), m.group(2)} if m else set()
        if any(is_test_file(p, test_files) for p in paths):
            dropped += sorted(paths)
        else:
            kept.append("".join(sec))
    return "".join(kept), sorted(set(dropped))


def score(outcomes: dict[str, str], instance: dict) -> dict[str, float]:
    """The reward components of a grading run's outcomes (see the module docstring)."""
    f2p, p2p = list(instance["FAIL_TO_PASS"]), list(instance["PASS_TO_PASS"])
    f2p_frac = sum(outcomes.get(t) == "passed" for t in f2p) / len(f2p)
    p2p_ok = all(outcomes.get(t) == "passed" for t in p2p)
    resolved = p2p_ok and f2p_frac == 1.0
    return {"fail_to_pass": f2p_frac, "pass_to_pass_ok": float(p2p_ok), "resolved": float(resolved),
            "dense": f2p_frac if p2p_ok else 0.0, "sparse": float(resolved)}


def grade(instance: dict, patch: str, repo: str | Path, config: SweConfig) -> dict:
    """Grade `patch` (the episode's diff) on a fresh worktree of the instance's base: {"components",
    "excluded" (test files left out), "outcomes"}, or {"infra_error": why}."""
    tests = list(instance["FAIL_TO_PASS"]) + list(instance["PASS_TO_PASS"])
    kept, excluded = split_diff(patch, set(files_of(tests)))
    apply_cfg = config.sandbox.model_copy(update={"timeout_s": 120.0})
    try:
        with Worktree.create(repo, instance["base_commit"]) as fresh:
            for what, diff in (("the model's patch", kept), ("test_patch", instance.get("test_patch") or "")):
                if diff.strip():
                    res = fresh.run(["git", "apply", "--whitespace=nowarn", "-"], apply_cfg, stdin=diff)
                    if not res.ok:
                        return {"infra_error": f"grading: {what} does not apply: {res.stderr.strip()[-500:]}"}
            run = run_tests(fresh, instance, config.sandbox, config.test_timeout_s, tests=tests)
    except (SandboxError, InstanceError, OSError) as e:
        return {"infra_error": f"grading: {type(e).__name__}: {e}"}
    if run.timed_out:
        return {"infra_error": f"grading: the test run timed out after {config.test_timeout_s:g} s"}
    return {"components": score(run.outcomes, instance), "excluded": excluded, "outcomes": dict(run.outcomes)}


# ---------------------------------------------------------------------------------------------
# The env


class SweEnv(TextEnv):
    """One instance per episode: reset(options={"task": instance}) (an instance dict, with
    `repos_dir` or the config's), then one tool call per step."""

    def __init__(self, config: SweConfig):
        super().__init__()
        self.config = config
        self.dense = config.reward_density == "dense"
        self.max_turns = config.max_turns
        self.wt: Worktree | None = None
        self.task: dict | None = None
        self._over = True

    def _repo(self, task: dict) -> Path:
        repos_dir = task.get("repos_dir") or self.config.repos_dir
        if not repos_dir:
            raise InstanceError(f"instance {task.get('instance_id')!r}: no repos_dir (task or env.repos_dir)")
        return find_repo(task["repo"], repos_dir)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if not options or "task" not in options:
            raise ValueError("swe: reset(options={'task': instance}); tasks come from envs.make_tasks('swe', ...)")
        self.close()
        self.task = task = options["task"]
        self.repo = self._repo(task)
        self.wt = Worktree.create(self.repo, task["base_commit"])
        self.tools = Tools(self.wt, task, self.config)
        self.turns, self._over = 0, False
        self.calls: Counter[str] = Counter()  # tool calls this episode ("malformed": unparsed)
        text = f"Repository: {task['repo']}\n\nIssue:\n{task['problem_statement'].strip()}"
        if task.get("hints_text"):
            text += f"\n\nHints:\n{task['hints_text'].strip()}"
        if self.config.show_tools:
            text += "\n\n" + TOOLS_HELP
        info = make_info(False, {}, [], turn=0, max_turns=self.max_turns, task_id=task["instance_id"])
        return text, info

    def step(self, action: str):
        if self._over or self.wt is None:
            raise RuntimeError("the episode is over (or never started): call reset()")
        self.turns += 1
        tool, error = None, None
        try:
            call = parse_call(action)
            tool = call.tool
            text = "" if tool == "submit" else self.tools(call)
        except (ParseError, ToolError) as e:
            text, error = f"error: {e}", str(e)
        except SandboxError as e:
            self.calls[tool or "malformed"] += 1
            return self._end_infra(f"sandbox: {e}", tool)
        self.calls[tool or "malformed"] += 1
        if tool == "submit" or self.turns >= self.max_turns:
            return self._finish(tool == "submit", text, tool)
        info = make_info(False, {}, [], turn=self.turns, max_turns=self.max_turns, tool=tool, tool_error=error)
        return text, 0.0, False, False, info

    def _finish(self, submitted: bool, text: str, tool: str | None):
        try:
            patch = self.wt.diff(self.config.sandbox)
        except SandboxError as e:
            return self._end_infra(f"diff: {e}", tool)
        result = grade(self.task, patch, self.repo, self.config)
        if "infra_error" in result:
            return self._end_infra(result["infra_error"], tool, patch=patch)
        comps = result["components"]
        won = comps["resolved"] == 1.0
        reward = comps["dense"] if self.dense else comps["sparse"]
        self._over = True
        self.close()
        verdict = (f"submitted: {'resolved' if won else 'not resolved'} "
                   f"(FAIL_TO_PASS passing: {comps['fail_to_pass']:.2f}, PASS_TO_PASS all passing: "
                   f"{bool(comps['pass_to_pass_ok'])})")
        obs = verdict if submitted else clip(text, self.config.output_chars) + "\n\n(out of turns) " + verdict
        info = make_info(won, comps, [], turn=self.turns, max_turns=self.max_turns, tool=tool,
                         submitted=submitted, patch=patch, excluded_test_files=result["excluded"],
                         outcomes=result["outcomes"], episode_stats=self._episode_stats())
        return obs, float(reward), submitted, not submitted, info

    def _end_infra(self, why: str, tool: str | None, **extra):
        self._over = True
        self.close()
        info = make_info(False, {}, [], turn=self.turns, max_turns=self.max_turns, tool=tool, error=why,
                         episode_stats=self._episode_stats(), **extra)
        info["infra_error"] = why
        return "", 0.0, False, True, info

    def _episode_stats(self) -> dict[str, int]:
        return {f"calls/{tool}": n for tool, n in sorted(self.calls.items())}

    def close(self) -> None:
        if self.wt is not None:
            self.wt.remove()
            self.wt = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
