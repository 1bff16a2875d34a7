"""The ALFWorld env: games generated from the package's floor plans (planner-checked, cached, split
by room), the official on-disk layout, rewards, demos and bad settings.

Generates a dozen games once per session (train: one per task type) into a temporary cache.
"""

import json
import random
import sys
from pathlib import Path

import pytest

from envs.alfworld.layouts import package_dir

if package_dir() is None:
    pytest.skip("the alfworld package is not installed", allow_module_level=True)

import envs  # noqa: E402
from envs import EnvConfigError, format_for  # noqa: E402
from envs.alfworld import TASK_TYPES, check_game, generate_one  # noqa: E402
from envs.alfworld.problems import goal_library  # noqa: E402

# Small rooms, where the planner is quick (a blind search: its time grows fast with receptacles)
# and kitchens last, so that only the tasks that need a kitchen (heat, cool) are played in one.
TRAIN_ROOMS = [420, 214, 316, 14, 29]
VALID_ROOMS = [23, 221, 329]
HELDOUT_ROOMS = [202, 304, 416]


@pytest.fixture(scope="session")
def cfg(tmp_path_factory):
    return {"train_size": 6, "heldout_size": 2, "train_floor_plans": TRAIN_ROOMS,
            "valid_floor_plans": VALID_ROOMS, "heldout_floor_plans": HELDOUT_ROOMS,
            "cache_dir": str(tmp_path_factory.mktemp("alfworld_cache")), "progress": False,
            "game_time_limit": None}  # in-process: no worker to spawn


@pytest.fixture(scope="session")
def source(cfg):
    src = envs.make_tasks("alfworld", cfg)
    for split in src.splits():
        src.tasks(split)
    return src


def play(env, task, actions):
    obs, info = env.reset(options={"task": task})
    return obs, info, [env.step(a) for a in actions]


# -- generation, cache, splits ------------------------------------------------------------------


def test_all_six_task_types_are_generated_with_the_librarys_goal_text(source):
    train = source.tasks("train")
    assert [t["task_type"] for t in train] == list(TASK_TYPES)  # one each, in order
    for task in train:
        templates = goal_library()[task["task_type"]]["templates"]
        game = json.loads(open(task["game"]).read())
        assert f"Your task is to: {task['goal']}." in game["grammar"]
        assert "UNKNOWN GOAL" not in game["grammar"] and game["solvable"] is True
        # the goal text is one of the official templates filled with this game's targets
        assert any(task["goal"].startswith(t.split("{")[0]) for t in templates), task["goal"]


def test_same_seed_gives_the_same_game(source, tmp_path):
    task = source.tasks("train")[1]
    again = generate_one(task["task_type"], task["floor_plan"], task["seed"], str(tmp_path))
    assert again["status"] == "kept" and again["walkthrough"] == task["walkthrough"]
    assert again["game_hash"] == task["game_hash"]
    assert (tmp_path / Path(task["game"]).name).read_text() == open(task["game"]).read()
    other = generate_one(task["task_type"], task["floor_plan"], task["seed"] + 7, str(tmp_path))
    assert other.get("game_hash") != task["game_hash"]


def test_every_kept_game_is_won_by_its_expert_plan(source, cfg):
    # (generation kept each game because the planner's plan won it: check_game, run again here
    # on one game; the replay below is the env's own verdict on every game)
    task = source.tasks("heldout")[0]
    assert check_game(task["game"]) == {"status": "kept", "reason": "", "walkthrough": task["walkthrough"]}
    env = envs.make("alfworld", cfg)
    for split in source.splits():
        for task in source.tasks(split):
            _, _, steps = play(env, task, task["walkthrough"])
            obs, reward, terminated, truncated, info = steps[-1]
            assert info["won"] and terminated and not truncated and reward == 1.0, task["id"]
            assert not any(s[4]["won"] for s in steps[:-1])


def test_splits_are_disjoint_by_room_and_heldout_seen_by_game(source):
    rooms = {split: {t["floor_plan"] for t in source.tasks(split)} for split in source.splits()}
    assert source.splits() == ["train", "valid", "heldout", "heldout_seen"]
    assert rooms["train"] <= set(TRAIN_ROOMS) and rooms["heldout_seen"] <= set(TRAIN_ROOMS)
    assert rooms["valid"] <= set(VALID_ROOMS) and rooms["heldout"] <= set(HELDOUT_ROOMS)
    assert not rooms["train"] & rooms["heldout"] and not rooms["train"] & rooms["valid"]
    assert not rooms["valid"] & rooms["heldout"]
    keys = {split: {source.task_key(t) for t in source.tasks(split)} for split in source.splits()}
    assert [len(k) for k in keys.values()] == [6, 2, 2, 2]
    for i, a in enumerate(source.splits()):
        for b in source.splits()[i + 1:]:
            assert not keys[a] & keys[b], (a, b)
    drawn = {source.task_key(t) for t in source.sample_tasks("train", 40, random.Random(0))}
    assert drawn == keys["train"]


def test_second_run_reuses_the_cache_and_counts_the_dropped(source, cfg):
    made = sum(r.generated for r in source.reports)
    assert made == sum(r.kept for r in source.reports) + sum(r.dropped for r in source.reports) > 0
    again = envs.make_tasks("alfworld", cfg)
    for split in again.splits():
        assert again.tasks(split) == source.tasks(split)
    assert again.generated == 0 and again.reports == []


def test_a_game_over_the_time_limit_is_dropped_and_its_worker_replaced(tmp_path):
    from envs.alfworld import AlfWorldGames

    games = AlfWorldGames(tmp_path)
    keys = [("pick_two_obj_and_place", 14, 5), ("look_at_obj_in_light", 214, 5)]
    report = games.generate(keys[:1], workers=1, progress=False, time_limit=0.05)
    assert (report.generated, report.kept, report.dropped) == (1, 0, 1) and "1 timed out" in str(report)
    record = games.records()["pick_two_obj_and_place-FloorPlan14-seed0000005"]
    assert record["status"] == "failed" and "more than 0.05 s" in record["reason"]
    assert not list(games.folder.glob(".*.tw-pddl"))  # the stopped worker's half-written game is gone
    report = games.generate(keys, workers=1, progress=False, time_limit=60)  # a fresh worker
    assert (report.generated, report.kept) == (1, 1)


# -- the env -----------------------------------------------------------------------------------


def test_first_observation_is_alfworlds_intro_with_the_task(source, cfg):
    env = envs.make("alfworld", cfg, admissible_commands=True)
    task = source.tasks("heldout")[0]
    obs, info = env.reset(options={"task": task})
    for key in envs.REQUIRED_INFO_KEYS:
        assert key in info
    assert obs.startswith("You are in the middle of a room. Looking quickly around you, you see ")
    assert f"Your task is to: {task['goal']}." in obs and "Welcome to TextWorld" not in obs
    assert obs.splitlines()[-1].startswith("Admissible commands: ")
    assert "look" in info["admissible_actions"] and "help" not in info["admissible_actions"]
    assert any(c.startswith("go to ") for c in info["admissible_actions"]) and info["max_turns"] == 50
    assert format_for("alfworld").choices(info)[0].startswith("> ")  # constrained decoding's choices


def test_invalid_command_gets_the_games_reply_and_the_episode_goes_on(source, cfg):
    env = envs.make("alfworld", cfg)
    task = source.tasks("train")[0]
    _, _, steps = play(env, task, ["dance wildly", "\x01\\q", "GO TO  nowhere"] + task["walkthrough"])
    for obs, reward, terminated, truncated, info in steps[:3]:
        assert obs == "Nothing happens."
        assert (reward, terminated, truncated, info["won"], info["infra_error"]) == (0.0, False, False, False, False)
    assert steps[-1][4]["won"] and steps[-1][2]


def test_max_turns_truncates_then_step_raises(source, cfg):
    env = envs.make("alfworld", cfg, max_turns=2)
    _, _, steps = play(env, source.tasks("train")[0], ["look", "inventory"])
    assert [s[3] for s in steps] == [False, True] and not steps[-1][2]
    with pytest.raises(RuntimeError):
        env.step("look")


def test_dense_rewards_sum_to_at_most_one_and_to_one_on_a_win(source, cfg):
    env = envs.make("alfworld", cfg, reward_density="dense")
    for task in source.tasks("train"):
        _, _, steps = play(env, task, task["walkthrough"])
        rewards = [s[1] for s in steps]
        assert steps[-1][4]["won"] and sum(rewards) == 1.0
        assert sum(r > 0 for r in rewards) > 1  # progress is paid along the way, not only at the win
        running = 0.0
        for r in rewards:
            running += r
            assert running <= 1.0
        # an unfinished episode, and random play, pay less than 1
        _, _, steps = play(env, task, task["walkthrough"][:-1])
        assert sum(s[1] for s in steps) < 1.0
    rng = random.Random(0)
    env = envs.make("alfworld", cfg, reward_density="dense", max_turns=8)
    for task in source.tasks("heldout"):
        obs, info = env.reset(options={"task": task})
        total, done = 0.0, False
        while not done:
            obs, reward, terminated, truncated, info = env.step(rng.choice(info["admissible_actions"] or ["look"]))
            total += reward
            done = terminated or truncated
            assert total <= 1.0
        assert total == 1.0 or not info["won"]


# -- demonstrations ----------------------------------------------------------------------------


def test_demonstrations_replay_the_expert_and_detours_recover(source, cfg):
    plain = list(envs.demonstrations("alfworld", source, "train", n=6, seed=0))
    detoured = list(envs.demonstrations("alfworld", source, "train", n=6, seed=0, mistakes=1.0))
    assert [d["task"]["walkthrough"] for d in plain] == [[t["action"] for t in d["turns"]] for d in plain]
    env = envs.make("alfworld", cfg)
    with_detour = 0
    for demo in detoured:
        assert demo["won"]
        obs, info = env.reset(options={"task": demo["task"]})
        for turn in demo["turns"]:  # what the env shows, and the detour was an admissible command
            assert turn["observation"] == obs
            assert turn.get("expert", True) or turn["action"] in info["admissible_actions"]
            obs, _, _, _, info = env.step(turn["action"])
        assert info["won"]
        policy = [text for text, mine in format_for("alfworld").segments(demo) if mine]
        assert policy == ["> " + t["action"] + "\n" for t in demo["turns"] if t.get("expert", True)]
        with_detour += any(not t.get("expert", True) for t in demo["turns"])
    assert with_detour >= 3
    stats = envs.spec("alfworld").demo_stats(detoured)
    assert stats["detour_share"] == with_detour / 6 and stats["demos/pick_two_obj_and_place"] == 1


def test_eval_stats_are_per_task_type():
    records = [{"task": {"task_type": "pick_two_obj_and_place"}, "won": True},
               {"task": {"task_type": "pick_two_obj_and_place"}, "won": False},
               {"task": {"task_type": "look_at_obj_in_light"}, "won": True},
               {"task": {"task_type": "look_at_obj_in_light"}, "won": True, "infra_error": True}]
    assert envs.spec("alfworld").eval_stats(records) == {
        "success/look_at_obj_in_light": 1.0, "tasks/look_at_obj_in_light": 1,
        "success/pick_two_obj_and_place": 0.5, "tasks/pick_two_obj_and_place": 2}


# -- the official data layout ------------------------------------------------------------------


def _write_official(root, source):
    """ALFWorld's layout, from generated games: json_2.1.1/<split>/<task>-<obj>-..-<room>/<trial>/
    game.tw-pddl (without our walkthrough, as the released games have none) + traj_data.json."""
    for folder, split in (("train", "train"), ("valid_seen", "heldout_seen"), ("valid_unseen", "heldout")):
        for i, task in enumerate(source.tasks(split)):
            meta = json.loads(open(task["game"].replace(".tw-pddl", ".meta.json")).read())
            p = meta["params"]
            trial = (root / "json_2.1.1" / folder / f"{p['task_type']}-{p['object_target']}-None-"
                     f"{p['parent_target'] or p['toggle_target']}-{p['floor_plan']}" / f"trial_T{i:04d}")
            trial.mkdir(parents=True)
            game = {k: v for k, v in json.loads(open(task["game"]).read()).items() if k != "walkthrough"}
            (trial / "game.tw-pddl").write_text(json.dumps(game))
            (trial / "traj_data.json").write_text(json.dumps({
                "task_type": p["task_type"], "scene": {"floor_plan": f"FloorPlan{p['floor_plan']}",
                                                       "scene_num": p["floor_plan"]}}))


def test_official_layout_loads_and_plays(source, cfg, tmp_path):
    _write_official(tmp_path, source)
    official = envs.make_tasks("alfworld", source="official", official_dir=str(tmp_path), train_size=10,
                               heldout_size=2)
    train, valid = official.tasks("train"), official.tasks("valid")
    assert len(train) == 4 and len(valid) == 2  # valid: the last 2 of train/, so 4 are left to train on
    assert not {t["game_hash"] for t in train} & {t["game_hash"] for t in valid}
    assert {t["game_hash"] for t in official.tasks("heldout")} == {t["game_hash"] for t in source.tasks("heldout")}
    assert {t["floor_plan"] for t in official.tasks("heldout_seen")} <= set(TRAIN_ROOMS)
    assert all(t["walkthrough"] is None and t["task_type"] in TASK_TYPES for t in train)
    demos = list(envs.demonstrations("alfworld", official, "heldout", n=2, seed=0))  # the planner plays
    assert len(demos) == 2 and all(d["won"] for d in demos)
    # a folder of games works for `launch.py eval --problems-file` too
    assert len(official.tasks_from_file(str(tmp_path / "json_2.1.1" / "valid_unseen"))) == 2


def test_official_data_missing_or_malformed_is_named(source, tmp_path):
    with pytest.raises(EnvConfigError, match=r"official_dir.*no_data.*json_2\.1\.1"):
        envs.make_tasks("alfworld", source="official", official_dir=str(tmp_path / "no_data"))
    _write_official(tmp_path, source)
    official = envs.make_tasks("alfworld", source="official", official_dir=str(tmp_path))
    (bad,) = list((tmp_path / "json_2.1.1" / "valid_unseen").rglob("game.tw-pddl"))[:1]
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=str(bad)):
        official.tasks("heldout")
    for trial in (tmp_path / "json_2.1.1" / "valid_seen").iterdir():
        for f in trial.rglob("traj_data.json"):
            f.unlink()
    with pytest.raises(ValueError, match="no traj_data.json"):
        official.tasks("heldout_seen")


# -- bad settings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, words",
    [
        ({"task_types": ["pick_and_fly"]}, ["task_types", "pick_and_place_simple"]),
        ({"heldout_floor_plans": [1, 999]}, ["heldout_floor_plans", "999", "FloorPlan999"]),
        ({"valid_floor_plans": []}, ["valid_floor_plans", "empty split"]),
        ({"task_types": ["pick_heat_then_place_in_recep"], "heldout_floor_plans": [401, 402]},
         ["heldout_floor_plans", "empty split", "kitchen"]),
        ({"heldout_floor_plans": [7, 1]}, ["train_floor_plans and heldout_floor_plans share", "[7]"]),
        ({"max_turns": 0}, ["max_turns"]),
        ({"source": "download"}, ["source", "official"]),
        ({"floor_plans": [1]}, ["floor_plans", "did you mean"]),
    ],
)
def test_bad_settings_fail_at_config_load_naming_the_key(bad, words):
    with pytest.raises(EnvConfigError) as e:
        envs.make_tasks("alfworld", **bad)
    for word in words:
        assert word in str(e.value)


def test_envs_work_without_the_alfworld_package(monkeypatch, tmp_path):
    # As if alfworld were not installed: configs still validate (against ALFRED's room list) and
    # playing asks for the package by name.
    monkeypatch.setitem(sys.modules, "alfworld", None)
    package_dir.cache_clear()
    try:
        source = envs.make_tasks("alfworld", train_size=1, cache_dir=str(tmp_path))
        with pytest.raises(EnvConfigError, match="999"):
            envs.make_tasks("alfworld", heldout_floor_plans=[999])
        with pytest.raises(ImportError, match=r"pip install 'alfworld>=0.4.2'"):
            source.tasks("train")
    finally:
        package_dir.cache_clear()
