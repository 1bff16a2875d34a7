"""Faults a user or an operator meets: two runs into one folder, a resumed run's logs, a full disk
during a checkpoint, an unwritable run folder, malformed moves, unsolvable task files, config errors
blamed on the right place, and a killed run's Ray processes."""
from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import REPO

import algos.checkpoint
import algos.metrics
import envs
import launch
from algos.checkpoint import COMPLETE, latest_checkpoint
from algos.config import ConfigError, load_config
from algos.run_folder import LOCK_FILE, claim_run_folder


def _error_line(capsys) -> str:
    """The `error:` line of what the command printed to stderr (progress bars go there too)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return next((line for line in re.split(r"[\r\n]", err) if line.startswith("error: ")), err)


def _hold_in_child(folder: Path) -> subprocess.Popen:
    """A child process holding `folder`'s lock (as a running job does), once it says 'held'."""
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from algos.run_folder import claim_run_folder
        with claim_run_folder({str(folder)!r}):
            print("held", flush=True)
            time.sleep(120)
    """)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


# 1. one run per run folder

def test_a_second_run_into_a_held_run_folder_is_refused_naming_the_folder_and_pid(tiny_recipe, tmp_path, capsys):
    child = _hold_in_child(tmp_path / "run")
    try:
        assert launch.main(["sft", str(tiny_recipe)]) == 2
        err = _error_line(capsys)
        assert err.startswith(f"error: {tmp_path / 'run'} is in use by another run (pid {child.pid} on ")
        assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing written beside the other run
        # train's SFT stage writes into its own folder (out_dir/sft here): held, so refused too
        assert launch.main(["train", str(tiny_recipe), "+rl.algo=grpo", f"out_dir={tmp_path / 'rl'}",
                            f"+rl.init_from={tmp_path / 'run'}"]) == 2
        assert f"{tmp_path / 'run'} is in use by another run (pid {child.pid}" in _error_line(capsys)
    finally:
        child.kill()
        child.wait()


def test_a_killed_runs_lock_is_taken_over_and_claims_nest_in_one_process(tmp_path, capsys):
    child = _hold_in_child(tmp_path / "run")
    child.send_signal(signal.SIGKILL)  # a kill -9: no cleanup ran, its PID stays in the lock file
    child.wait()
    assert f"pid {child.pid} " in (tmp_path / "run" / LOCK_FILE).read_text()
    with claim_run_folder(tmp_path / "run"):
        assert f"taking over the lock of a run that ended without releasing it (pid {child.pid} " in capsys.readouterr().out
        assert f"pid {os.getpid()} " in (tmp_path / "run" / LOCK_FILE).read_text()
        with claim_run_folder(tmp_path / "run"):  # train -> its RL stage: the same job, reentrant
            pass
        assert f"pid {os.getpid()} " in (tmp_path / "run" / LOCK_FILE).read_text()  # still held
    assert (tmp_path / "run" / LOCK_FILE).read_text() == ""  # released cleanly: nothing to take over
    with claim_run_folder(tmp_path / "run"):
        assert "taking over" not in capsys.readouterr().out


# 2. a resumed run's log reads as one run

def test_sft_killed_between_checkpoints_then_resumed_logs_each_step_once(tiny_recipe, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    real_log = algos.metrics.MetricsLogger.log

    def killed_after_step_3(self, step, metrics, prefix=""):
        real_log(self, step, metrics, prefix)
        if prefix == "sft/" and step == 3:  # logged past the step-2 checkpoint, then killed
            raise KeyboardInterrupt

    monkeypatch.setattr(algos.metrics.MetricsLogger, "log", killed_after_step_3)
    with pytest.raises(KeyboardInterrupt):
        launch.main(["sft", str(tiny_recipe)])
    monkeypatch.setattr(algos.metrics.MetricsLogger, "log", real_log)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "sft/loss" in r] == [1, 2, 3]
    # TensorBoard reads a run's event files in name order: time in seconds, host, pid, then a
    # per-process writer count that sorts as text ("10" < "9"). A resumed run is a later process in
    # a later second; in this one process, within one second, the count alone would order them.
    time.sleep(1.1)
    assert launch.main(["sft", str(tiny_recipe), "--resume"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "sft/loss" in r] == [1, 2, 3, 4]
    events = EventAccumulator(str(tmp_path / "run" / "tb")).Reload()
    assert [e.step for e in events.Scalars("sft/loss")] == [1, 2, 3, 4]  # purge_step hid the killed run's 3


# 3. a full disk during a checkpoint

def test_a_full_disk_during_a_checkpoint_is_an_error_naming_it_and_the_last_checkpoint_stays(
        tiny_recipe, tmp_path, monkeypatch, capsys):
    real_save = algos.checkpoint.torch.save

    def disk_full_at(step):
        def save(obj, path, *a, **k):
            if f"step_{step:07d}" in str(path):  # what torch's zip writer raises when the disk fills
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4416 vs 4304")
            return real_save(obj, path, *a, **k)
        return save

    monkeypatch.setattr("algos.run_folder._free_bytes", lambda path: 2**20)  # 1 MB left
    monkeypatch.setattr(algos.checkpoint.torch, "save", disk_full_at(4))
    assert launch.main(["sft", str(tiny_recipe)]) == 2
    err = _error_line(capsys)
    root = tmp_path / "run" / "checkpoints"
    assert err.startswith(f"error: no space left on the device holding {root} while writing checkpoint "
                          "step_0000004; 1.0 MB free there")
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000002"]  # no partial folder left
    assert latest_checkpoint(tmp_path / "run").name == "step_0000002" and (root / "step_0000002" / COMPLETE).exists()
    monkeypatch.setattr(algos.checkpoint.torch, "save", real_save)
    assert launch.main(["sft", str(tiny_recipe), "--resume"]) == 0  # the previous checkpoint resumes
    assert f"resumed from {root / 'step_0000002'} at step 2" in capsys.readouterr().out
    assert latest_checkpoint(tmp_path / "run").name == "step_0000004"


def _mount_tmpfs(folder: Path, options: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    try:
        return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                              capture_output=True).returncode == 0
    except OSError:
        return False


def test_a_real_full_tmpfs_gives_the_no_space_error(tiny_recipe, tmp_path, capsys):
    disk = tmp_path / "small"
    if not _mount_tmpfs(disk, "size=1m"):
        pytest.skip("cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN); the injected test covers it")
    try:
        assert launch.main(["sft", str(tiny_recipe), f"out_dir={disk / 'run'}"]) == 2
        assert _error_line(capsys).startswith("error: no space left on the device holding ")
        assert not list((disk / "run" / "checkpoints").glob(".partial_*"))
    finally:
        subprocess.run(["umount", str(disk)], check=False)


# 4. an unwritable run folder

def test_an_unwritable_out_dir_is_an_error_line_naming_the_path(tiny_recipe, tmp_path, monkeypatch, capsys):
    (tmp_path / "a_file").write_text("")
    assert launch.main(["sft", str(tiny_recipe), f"out_dir={tmp_path / 'a_file' / 'run'}"]) == 2
    err = _error_line(capsys)
    assert err.startswith(f"error: cannot create {tmp_path / 'a_file' / 'run'} while creating the run folder: a part")

    read_only = tmp_path / "ro"
    if _mount_tmpfs(read_only, "ro,size=1m"):  # a real read-only mount (root ignores chmod)
        try:
            assert launch.main(["sft", str(tiny_recipe), f"out_dir={read_only / 'run'}"]) == 2
            err = _error_line(capsys)
        finally:
            subprocess.run(["umount", str(read_only)], check=False)
        assert err.startswith("error: cannot write ") and "Read-only file system" in err and "ro/run" in err
    # and where no mount can be made, the same error injected
    real_mkdir = Path.mkdir

    def refused(self, *a, **k):
        if self.name == "denied":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", refused)
    assert launch.main(["sft", str(tiny_recipe), f"out_dir={tmp_path / 'denied'}"]) == 2
    err = _error_line(capsys)
    assert err.startswith(f"error: cannot write {tmp_path / 'denied'} while creating the run folder: Permission denied")


# 5. malformed Countdown moves

def test_countdown_answers_invalid_action_to_huge_and_non_ascii_numbers():
    env = envs.make("countdown_search", reward_density="dense")
    task = {"numbers": [5, 5, 7], "target": 35}
    for move, why in (("1" * 5000 + "+5", "holds a number of 5000 digits"),
                      ("٥+٥", "digits other than 0-9"), ("５+５", "digits other than 0-9")):
        env.reset(options={"task": task})
        obs, reward, terminated, truncated, info = env.step(move)
        assert obs.startswith("Invalid action: ") and why in obs and len(obs) < 400, move
        assert not terminated and info["reward_components"]["valid"] == 0.0
    env.reset(options={"task": task})
    obs, *_ = env.step("5+5=10")
    assert obs.startswith("Exploring Operation: 5+5=10")
    # the single-turn verifier reads the same numbers and never raises on them
    single = envs.make("countdown")
    single.reset(options={"task": task})
    obs, reward, *_ = single.step("Current State: 35:[5, 5, 7], Operations: []\nExploring Operation: "
                                  + "7" * 5000 + "*5=35, Resulting Numbers: [35]\n35,35 equal: Goal Reached")
    assert reward == 0.0 and obs.startswith("Verdict: incorrect") and len(obs) < 300


# 6. unsolvable problems in a user's file

def test_unsolvable_problems_in_a_users_file_are_warned_with_count_and_lines(tiny_recipe, tmp_path):
    problems = tmp_path / "mine.jsonl"
    problems.write_text('{"numbers": [3, 4, 5], "target": 27}\n\n{"numbers": [1, 1, 1], "target": 99}\n'
                        '{"numbers": [2, 9, 9], "target": 20}\n{"numbers": [1, 1, 2], "target": 97}\n')
    source = envs.make_tasks("countdown", **load_config(tiny_recipe).env_options())
    with pytest.warns(UserWarning, match=r"mine.jsonl: 2 of 4 problems have no solution \(lines 3, 5\).*at most 50.0%"):
        tasks = source.tasks_from_file(str(problems))
    assert [t["solvable"] for t in tasks] == [True, False, True, False]  # kept, marked


# 7. config errors blamed on the key and the place that set it

def test_config_errors_name_the_key_and_the_command_line_when_an_override_caused_them(tmp_path):
    with pytest.raises(ConfigError, match=r"^unknown key 'foo' \(command-line override\)"):
        load_config("configs/countdown3_grpo.yaml", ["foo.bar=1"])
    with pytest.raises(ConfigError, match=r"^bad value for 'rl.group_size' \(command-line override\): "
                                          r"rl.algo=grpo needs rl.group_size ≥ 2"):
        load_config("configs/countdown3_grpo.yaml", ["rl.group_size=1"])
    with pytest.raises(ConfigError, match=r"^bad value for 'runtime.offload_optimizer' \(command-line override\)"):
        load_config("configs/countdown3_grpo.yaml", ["runtime.offload_optimizer=true"])
    # the same mistakes written in a file are the file's, and another override is not blamed for them
    recipe = tmp_path / "r.yaml"
    recipe.write_text("base: " + str(REPO / "configs" / "countdown3_grpo.yaml") + "\nrl:\n  group_size: 1\n")
    with pytest.raises(ConfigError, match=rf"^bad value for 'rl' \(in {recipe}\): rl.algo=grpo needs rl.group_size"):
        load_config(recipe, ["rl.lr=1e-4"])
    recipe.write_text("base: " + str(REPO / "configs" / "countdown3_grpo.yaml") + "\nfoo:\n  bar: 1\n")
    with pytest.raises(ConfigError, match=rf"^unknown key 'foo' \(in {recipe}\)"):
        load_config(recipe, ["sft.steps=3"])


# 8. a killed run's Ray processes

RAY_DRIVER = """
import sys, time
sys.path.insert(0, {repo!r})
import ray
from rollout.worker import RayConfig, init_ray
init_ray(RayConfig(num_cpus=1))

@ray.remote(num_cpus=1)
class Echo:
    def ping(self):
        return "pong"

print(ray.get(Echo.remote().ping.remote()), flush=True)
time.sleep({sleep})
"""


def _ray_processes() -> set[int]:
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return {int(line.split()[0]) for line in out.splitlines()
            if "ray::" in line or "raylet" in line or "gcs_server" in line}


def test_a_new_run_starts_while_a_killed_runs_ray_processes_linger(tmp_path):
    """kill -9 of a driver leaves some of its local cluster's processes behind for about a minute
    (docs/cluster.md); every run starts a cluster of its own (address=local), so the next run
    does not wait for them or join them."""
    before = _ray_processes()
    killed = subprocess.Popen([sys.executable, "-c", RAY_DRIVER.format(repo=str(REPO), sleep=120)],
                              stdout=subprocess.PIPE, text=True)
    assert killed.stdout.readline().strip() == "pong"
    ours = _ray_processes() - before
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    time.sleep(1)
    lingering = ours & _ray_processes()
    t0 = time.perf_counter()
    second = subprocess.run([sys.executable, "-c", RAY_DRIVER.format(repo=str(REPO), sleep=0)],
                            capture_output=True, text=True, timeout=180)
    assert second.returncode == 0 and second.stdout.strip() == "pong", second.stderr[-2000:]
    assert time.perf_counter() - t0 < 120
    print(f"{len(lingering)} of the killed run's {len(ours)} Ray processes were still alive when the next run started")
