"""What an RL user reads when success stalls: transcripts (`launch.py show`), plots (`launch.py
plot`) and sweeps (`launch.py sweep`), on tiny runs of the toy two-turn env (tests/rl_helpers.py)."""
from __future__ import annotations

import json

import pytest
import yaml
from rl_helpers import GOOD, rl_experiment, tiny_policy, tiny_tokenizer

import launch


def _policy_folder(tmp_path):
    tok = tiny_tokenizer()
    folder = tmp_path / "policy"
    tiny_policy(tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two tiny RL runs that differ in rl.algo and rl.lr, with valid evals every iteration."""
    from algos.rl import train_rl

    root = tmp_path_factory.mktemp("inspect")
    folder = _policy_folder(root)
    runs = []
    for algo, lr in (("grpo", 3e-3), ("rloo", 1e-3)):
        exp = rl_experiment(root / algo, algo=algo, lr=lr, iterations=2, eval_every=1, save_every=2)
        exp.reward.density = "dense"  # 0.5 a good turn: each turn's reward is checked below
        train_rl(exp, folder)
        runs.append(root / algo / "run")
    return runs


def test_eval_files_keep_each_episodes_conversation(two_runs):
    run = two_runs[0]
    names = sorted(p.name for p in (run / "eval").glob("*.json"))
    assert names == ["heldout_before_rl.json", "heldout_rl.json", "valid_1.json"], names
    records = json.loads((run / "eval" / "heldout_rl.json").read_text())["records"]
    for r in records:
        t = r["transcript"]
        assert t[0] == {"observation": "turn 1: say a letter"}
        assert [turn["observation"] for turn in t[1:]] == ["turn 2: another letter", ""][: len(t) - 1]
        assert sum(turn["reward"] for turn in t[1:]) == pytest.approx(r["return"])
        # the toy env pays 0.5 a good turn (dense): each turn's reward agrees with its action
        assert all(turn["reward"] == 0.5 * (bool(turn["action"]) and turn["action"][0] in GOOD[k])
                   for k, turn in enumerate(t[1:]))
        assert r["end"] == ("won" if r["won"] else "ended by the env, not won")


def test_show_prints_the_turns_and_filters(two_runs, capsys):
    path = two_runs[0] / "eval" / "heldout_rl.json"
    records = json.loads(path.read_text())["records"]
    assert launch.main(["show", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.count("turn 1: say a letter") == len(records) and "turn 2: another letter" in out
    assert "[turn 1]" in out and "[turn 2]" in out and "ended:" in out
    first = records[0]["transcript"][1]["action"].strip()
    if first:
        assert first in out
    assert launch.main(["show", str(path), "--failed"]) == 0
    failed = capsys.readouterr().out
    assert failed.count("turn 1: say a letter") == sum(not r["won"] for r in records)
    assert "WON" not in failed.split("\n", 1)[1]
    assert launch.main(["show", str(path), "--task", records[1]["task"]["id"]]) == 0
    one = capsys.readouterr().out
    assert one.count("turn 1: say a letter") == 1 and "#1 " in one
    assert launch.main(["show", str(path), "--task", "no-such-task"]) == 2
    assert "no episode matches --task 'no-such-task'" in capsys.readouterr().err
    assert launch.main(["show", str(two_runs[0])]) == 0  # a run folder: its newest eval file
    assert "heldout_rl.json" in capsys.readouterr().out


def test_plot_draws_each_series_labelled_by_the_differing_keys(two_runs, tmp_path):
    from algos.plot import plot_runs

    out = tmp_path / "ab.png"
    fig = plot_runs(two_runs, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    panels = {ax.get_title(): ax for ax in fig.axes}
    assert list(panels) == ["success", "mean episode reward", "KL to π_old", "entropy", "clip fraction"]
    labels = {line.get_label() for line in panels["mean episode reward"].lines}
    assert labels == {"rl.algo=grpo, rl.lr=0.003", "rl.algo=rloo, rl.lr=0.001"}, labels
    reward = next(line for line in panels["mean episode reward"].lines if "grpo" in line.get_label())
    assert list(reward.get_xdata()) == [1, 2]  # one point per RL iteration
    success = {line.get_label() for line in panels["success"].lines}
    assert "rl.algo=grpo, rl.lr=0.003: valid" in success and "rl.algo=rloo, rl.lr=0.001: test" in success
    test_points = next(line for line in panels["success"].lines if line.get_label().endswith("grpo, rl.lr=0.003: test"))
    assert list(test_points.get_xdata()) == [0, 2]  # before and after RL
    assert launch.main(["plot", str(two_runs[0]), "--out", str(tmp_path / "one.png")]) == 0
    assert (tmp_path / "one.png").exists()


def _toy_recipe(tmp_path, policy):
    recipe = tmp_path / "toy.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "toy", "out_dir": str(tmp_path / "runs" / "toy"), "data_dir": str(tmp_path / "data"),
        "env": {"name": "toy_two_turn"}, "runtime": {"device": "cpu"}, "eval": {"split": "heldout"},
        "model": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "max_seq_len": 256},
        "rollout": {"num_workers": 0, "max_turn_tokens": 3, "temperature": 1.0},
        "rl": {"algo": "grpo", "init_from": str(policy), "iterations": 1, "tasks_per_iter": 4, "group_size": 4,
               "minibatch_size": 16, "micro_batch_size": 16, "lr": 3e-3, "eval_every": 0, "save_every": 1},
    }))
    return recipe


def test_sweep_runs_the_grid_writes_one_table_and_resumes_without_rerunning(tmp_path, monkeypatch):
    import algos.sweep as sweep_mod

    recipe = _toy_recipe(tmp_path, _policy_folder(tmp_path))
    ran = []
    real = sweep_mod.run_point

    def killed_on_second(recipe, overrides):
        ran.append(overrides)
        if len(ran) == 2:
            raise KeyboardInterrupt  # the sweep is killed during its second run
        return real(recipe, overrides)

    monkeypatch.setattr(sweep_mod, "run_point", killed_on_second)
    with pytest.raises(KeyboardInterrupt):
        sweep_mod.sweep(str(recipe), ["rl.algo=grpo,rloo", "rl.lr=1e-3"])
    root = tmp_path / "runs" / "sweep_toy"
    assert (root / "rl.algo=grpo" / "sweep_result.json").exists()
    assert not (root / "rl.algo=rloo" / "sweep_result.json").exists()

    ran.clear()
    monkeypatch.setattr(sweep_mod, "run_point", lambda r, o: (ran.append(o), real(r, o))[1])
    out = sweep_mod.sweep(str(recipe), ["rl.algo=grpo,rloo", "rl.lr=1e-3"])
    assert len(ran) == 1 and f"out_dir={root / 'rl.algo=rloo'}" in ran[0]  # only the unfinished point
    assert "rl.lr=1e-3" in ran[0]  # the fixed override reaches every run
    assert [r["point"] for r in out["rows"]] == [{"rl.algo": "grpo"}, {"rl.algo": "rloo"}]
    table = (root / "sweep.md").read_text().splitlines()
    rows = [line for line in table if line.startswith("| grpo") or line.startswith("| rloo")]
    assert len(rows) == 2 and table[2].startswith("| rl.algo | valid | test before | test after")
    for row, result in zip(rows, out["rows"]):
        assert f"{100 * result['result']['after']['accuracy']:.1f}%" in row
    saved = yaml.safe_load((root / "rl.algo=rloo" / "config.yaml").read_text())
    assert saved["rl"]["algo"] == "rloo" and saved["rl"]["lr"] == 1e-3
    assert json.loads((root / "sweep.json").read_text())["rows"][1]["result"]["after"]["tasks"] == 2
    assert (root / "sweep.png").exists()


def test_sweep_names_a_bad_axis_before_any_run(tmp_path, capsys):
    recipe = _toy_recipe(tmp_path, _policy_folder(tmp_path))
    assert launch.main(["sweep", str(recipe), "rl.algo=grpo,nope"]) == 2
    err = capsys.readouterr().err
    assert "rl.algo" in err and "nope" in err
    assert not (tmp_path / "runs" / "sweep_toy").exists()
    assert launch.main(["sweep", str(recipe), "rl.lr=1e-3"]) == 2
    assert "no axis" in capsys.readouterr().err


def test_sweep_as_ray_tasks_runs_every_point(tmp_path):
    """--ray: the points run as Ray tasks (here a local cluster whose workers know the toy env)."""
    import os
    from pathlib import Path

    ray = pytest.importorskip("ray")
    from algos.sweep import sweep

    repo = Path(__file__).resolve().parent.parent
    if ray.is_initialized():
        ray.shutdown()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="turnstile",
             runtime_env={"env_vars": {"PYTHONPATH": f"{repo / 'tests'}:{repo}", "OMP_NUM_THREADS": "1"},
                          "worker_process_setup_hook": "rl_helpers.register_toy_env"})
    try:
        recipe = _toy_recipe(tmp_path, _policy_folder(tmp_path))
        out = sweep(str(recipe), ["rl.algo=grpo,rloo"], use_ray=True)
    finally:
        ray.shutdown()
    assert [r["point"]["rl.algo"] for r in out["rows"]] == ["grpo", "rloo"]
    for r in out["rows"]:
        run = Path(r["run"])
        assert (run / "sweep_result.json").exists() and r["result"]["after"]["tasks"] == 2
        assert yaml.safe_load((run / "config.yaml").read_text())["rl"]["algo"] == r["point"]["rl.algo"]
