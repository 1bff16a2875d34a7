"""The ALFWorld env: games generated from the package's floor plans (planner-checked, cached, split
by room), the expert planner against fast-downward's, the official on-disk layout, rewards, demos,
the per-task-type eval table, a short SFT -> RL run and bad settings.

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
from envs.alfworld import TASK_TYPES, check_game, expert, generate_one  # noqa: E402
from envs.alfworld.generate import TEXTWORLD_ORIGINALS, fast_downward_plan, plan_from_here, start_game  # noqa: E402
from envs.alfworld.problems import goal_library  # noqa: E402

# Small rooms, where fast-downward (the optimal planner the expert is checked against: a blind
# search, its time grows fast with receptacles) is quick, and kitchens last, so that only the
# tasks that need a kitchen (heat, cool) are played in one.
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


def test_a_basin_without_its_sinks_point_is_named_as_alfworld_names_it(tmp_path):
    # FloorPlan429's layout places no sink: its basin gets a location of its own, as
    # "Sink|1|SinkBasin", which ALFWorld's demangler reads as "sinkbasin 1" (a "SinkBasin|1"
    # would read "sinkbasinbasin 1", a name no ALFWorld game has).
    record = generate_one("pick_clean_then_place_in_recep", 429, 0, str(tmp_path))
    assert record["status"] == "kept" and any(c.endswith("with sinkbasin 1") for c in record["walkthrough"])
    game = start_game(str(tmp_path / f"{record['key']}.tw-pddl"))
    intro = game.reset().feedback
    game.close()
    assert "a sinkbasin 1" in intro and "basinbasin" not in intro


def test_the_fast_downward_option_makes_the_same_games_in_a_folder_of_its_own(source, tmp_path):
    from envs.alfworld import AlfWorldGames

    assert AlfWorldGames(tmp_path).folder.name == "generated-v2"
    assert AlfWorldGames(tmp_path, "fast_downward").folder.name == "generated-v2-fast_downward"
    for task in source.tasks("train")[:3]:  # pick-and-place, look-at-in-light, clean: small rooms
        record = generate_one(task["task_type"], task["floor_plan"], task["seed"], str(tmp_path), "fast_downward")
        assert record["status"] == "kept" and record["planner"] == "fast_downward"
        assert record["game_hash"] == task["game_hash"]  # the same problem and task text
        assert len(record["walkthrough"]) == len(task["walkthrough"])  # both plans are shortest
        ours = json.loads(open(task["game"]).read())
        theirs = json.loads((tmp_path / Path(task["game"]).name).read_text())
        assert {k: v for k, v in ours.items() if k != "walkthrough"} == {k: v for k, v in theirs.items()
                                                                      if k != "walkthrough"}


# -- the expert planner ------------------------------------------------------------------------


def _walk(game, rng, steps: int):
    """States along a random walk (admissible moves; now and then the expert's next command)."""
    state = game.reset()
    for _ in range(steps):
        if state.won:
            return
        yield state
        plan = expert.plan_game(game)
        moves = [c for c in state.admissible_commands if c.split()[0] not in ("look", "examine", "inventory", "help")]
        state, _, _ = game.step(plan[0] if plan and rng.random() < 0.3 else rng.choice(moves))


def test_expert_plans_are_as_short_as_fast_downwards_and_win(source, tmp_path):
    # On states sampled along random walks in games of all six types (objects carried elsewhere,
    # receptacles left open, a wrong object in hand, ...), the expert's plan has the optimal
    # planner's length, and it wins when replayed, at its last command. Also under a metric
    # (the domain's action costs: clean/heat/cool/use cost 5), where both minimise the cost.
    rng, compared = random.Random(0), 0
    tasks = source.tasks("train") + source.tasks("heldout")
    for n, task in enumerate(tasks):
        path, metric = task["game"], n == 2
        if metric:
            game = json.loads(open(path).read())
            game["pddl_problem"] = game["pddl_problem"].rstrip()[:-1] + "\n(:metric minimize (total-cost))\n)"
            path = str(tmp_path / "metric.tw-pddl")
            Path(path).write_text(json.dumps(game))
        game = start_game(path, "fast_downward")
        assert expert.goal_of(game).task_type == task["task_type"]
        assert expert.uses_metric(game) == metric
        steps = 3 if task["floor_plan"] in (14, 29) else 8  # kitchens: fast-downward is slow there
        for state in _walk(game, rng, steps):
            plan, optimal = expert.plan_game(game), fast_downward_plan(game)
            assert len(plan) == len(optimal) > 0, (task["id"], state.feedback, plan, optimal)
            compared += 1
        state, final = game.unwrapped.state, expert.plan_game(game)
        for i, command in enumerate(final):
            assert command in state.admissible_commands, (task["id"], command)
            state, _, _ = game.step(command)
            assert bool(state.won) == (i == len(final) - 1), (task["id"], final)
        assert final or state.won
        game.close()
    assert compared >= 40


def _world(*facts):
    """An expert World from facts written as tuples: ("inreceptacle", "tissuebox_bar_1", "toilet_bar_1")."""
    from types import SimpleNamespace as NS

    props = [NS(name=f[0], arguments=[NS(name=a) for a in f[1:]]) for f in facts]
    entities = {a for f in facts for a in f[1:]}
    return expert.World(props, {e: e.replace("_bar_", " ") for e in entities})


def test_expert_frees_its_hands_where_it_must_open_anyway():
    # Holding another object by two closed cabinets, one holding a target: putting it down in that
    # one (open, put, take: 3) beats the other (open, put, open, take: 4), though both are "here".
    # A hand-made state, as a dense reward's off-plan step can leave.
    receptacles = {"cabinet_bar_1": "loc_bar_1", "cabinet_bar_2": "loc_bar_1", "toilet_bar_1": "loc_bar_2",
                   "shelf_bar_1": "loc_bar_3"}
    objects = {"toiletpaper_bar_1": None, "tissuebox_bar_1": "cabinet_bar_2", "tissuebox_bar_2": "shelf_bar_1"}
    world = _world(("atlocation", "agent1", "loc_bar_1"), ("holds", "agent1", "toiletpaper_bar_1"),
                   ("openable", "cabinet_bar_1"), ("openable", "cabinet_bar_2"),
                   *[("receptacletype", r, r.split("_")[0] + "type") for r in receptacles],
                   *[("receptacleatlocation", r, loc) for r, loc in receptacles.items()],
                   *[("cancontain", r.split("_")[0] + "type", o.split("_")[0] + "type")
                     for r in receptacles for o in objects],
                   *[("objecttype", o, o.split("_")[0] + "type") for o in objects],
                   *[("pickupable", o) for o in objects],
                   *[("inreceptacle", o, r) for o, r in objects.items() if r])
    goal = expert.Goal("pick_two_obj_and_place", "tissueboxtype", "toilettype")
    assert expert.plan(world, goal) == [
        "open cabinet 2", "move toiletpaper 1 to cabinet 2", "take tissuebox 1 from cabinet 2", "go to toilet 1",
        "move tissuebox 1 to toilet 1", "go to shelf 1", "take tissuebox 2 from shelf 1", "go to toilet 1",
        "move tissuebox 2 to toilet 1"]


def test_goals_outside_the_six_task_types_fall_back_to_fast_downward(source, tmp_path):
    task = source.tasks("train")[0]
    game = json.loads(open(task["game"]).read())
    problem = game["pddl_problem"]
    obj = expert.parse_goal(problem).obj  # the task's object type: only hold one
    goal = f"(:goal (and (exists (?o - object ?a - agent) (and (objectType ?o {obj}) (holds ?a ?o)))))\n)"
    game["pddl_problem"] = problem[: problem.index("(:goal")] + goal
    assert expert.parse_goal(game["pddl_problem"]) is None
    assert expert.parse_goal(problem.replace("(inReceptacle ?o ?r)", "(isSliced ?o) (inReceptacle ?o ?r)")) is None
    path = tmp_path / "other_goal.tw-pddl"
    path.write_text(json.dumps(game))
    env = start_game(str(path))
    env.reset()
    assert expert.plan_game(env) is None
    plan = plan_from_here(env, "expert")  # fast-downward's
    assert plan == fast_downward_plan(env) and len(plan) == 2 and plan[1].startswith("take ")
    with pytest.raises(ValueError, match="planner"):
        plan_from_here(env, "astar")


def test_textworld_parses_each_template_once_without_changing_any_text(source, monkeypatch):
    # start_game makes textworld's backend cache its template parses (the bulk of a step's time);
    # with textworld's own functions put back, a game plays out with exactly the same texts.
    import textworld.envs.pddl.textgen as textgen
    from textworld.logic import Rule

    task = source.tasks("train")[5]  # two objects: takes, moves, opens
    rng = random.Random(1)

    def transcript():
        game = start_game(task["game"])
        state, out = game.reset(), []
        for _ in range(12):
            out.append((state.feedback, state.admissible_commands))
            state, _, _ = game.step(rng.choice(state.admissible_commands))
        game.close()
        return out

    start_game(task["game"]).close()  # the caches are in
    assert textgen._parse_and_convert.__name__ == "cached_symbols" and len(TEXTWORLD_ORIGINALS) == 3
    cached = transcript()
    rng.seed(1)
    for (owner, name), original in TEXTWORLD_ORIGINALS.items():
        monkeypatch.setattr(owner, name, original)
    assert Rule.parse_conjunctive_query("openable(r:receptacle)").preconditions[0].name == "openable"
    assert transcript() == cached


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


def test_dense_rewards_are_the_same_with_either_planner(source, cfg):
    # Off the expert plan every step asks the planner; the expert's remaining length is the
    # optimal planner's, so the rewards (and plan_left) of a random walk are fast-downward's.
    rng = random.Random(3)
    plays = {planner: envs.make("alfworld", cfg, reward_density="dense", planner=planner, max_turns=12)
             for planner in ("expert", "fast_downward")}
    train = source.tasks("train")
    for task in [train[0], train[1], train[2], train[5]]:  # the small rooms' games
        _, info = plays["expert"].reset(options={"task": task})
        actions, results = [], {"expert": [], "fast_downward": []}
        done = False
        while not done:
            action = task["walkthrough"][0] if not actions else rng.choice(info["admissible_actions"])
            actions.append(action)
            _, reward, terminated, truncated, info = plays["expert"].step(action)
            results["expert"].append((reward, info["reward_components"]["plan_left"]))
            done = terminated or truncated
        plays["fast_downward"].reset(options={"task": task})
        for action in actions:
            _, reward, _, _, info = plays["fast_downward"].step(action)
            results["fast_downward"].append((reward, info["reward_components"]["plan_left"]))
        assert results["expert"] == results["fast_downward"], task["id"]
        assert len({left for _, left in results["expert"]}) > 2  # the walk moved the plan's length about


def test_launch_eval_prints_a_table_per_task_type(capsys):
    # launch.py eval (and RL's before/after) print the overall table, then one row per task
    # type from the env's eval_stats (`success/<type>`, `tasks/<type>`): a generic breakdown.
    from algos.evaluate import print_summary

    records = [{"task": {"task_type": "pick_two_obj_and_place"}, "won": True},
               {"task": {"task_type": "pick_two_obj_and_place"}, "won": False},
               {"task": {"task_type": "look_at_obj_in_light"}, "won": True}]
    summary = {"tasks": 3, "accuracy": 2 / 3, "mean_tokens": 40.0, "truncated": 0.0, "tokens_per_s": 100.0,
               "seconds": 1.0, "mean_turns": 6.0, **envs.spec("alfworld").eval_stats(records)}
    print_summary("alfworld: heldout", {"heldout": summary})
    out = capsys.readouterr().out
    table = out[out.index("success per group"):]
    rows = [line for line in table.splitlines() if "heldout" in line and "_" in line]
    assert len(rows) == 2 and "look_at_obj_in_light" in rows[0] and "100.0%" in rows[0]
    assert "pick_two_obj_and_place" in rows[1] and " 2 " in rows[1] and "50.0%" in rows[1]


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


def test_search_prior_ranks_by_finds_per_receptacle_and_the_cost_of_opening():
    from envs.alfworld.search import SearchPrior, contents

    plans = [["go to cabinet 3", "open cabinet 3", "take apple 1 from cabinet 3"],
             ["go to cabinet 5", "open cabinet 5", "take apple 2 from cabinet 5"],
             ["go to countertop 1", "take apple 1 from countertop 1"],
             ["go to sidetable 1", "take book 1 from sidetable 1", "go to desk 1", "use desklamp 1"]]
    room = ["cabinet 2", "cabinet 1", "drawer 1", "countertop 1", "desk 1"]
    # Without room sizes, two finds in cabinets (opened: two commands a look) weigh as one on a countertop
    # and a tie goes to the room's order; in FloorPlan7 (13 cabinets, one countertop) the countertop leads
    unsized = SearchPrior([{"walkthrough": w, "floor_plan": None} for w in plans])
    assert unsized.order("apple", room)[:3] == ["cabinet 2", "cabinet 1", "countertop 1"]
    kitchen = SearchPrior([{"walkthrough": w, "floor_plan": 7} for w in plans])
    assert kitchen.order("apple", room)[:3] == ["countertop 1", "cabinet 2", "cabinet 1"]
    assert kitchen.order("desklamp", room)[0] == "desk 1"  # a lamp is looked for where plans used one
    assert contents("You open the drawer 2. The drawer 2 is open. In it, you see a knife 1, and a fork 3.") == [
        ("knife 1", "drawer 2"), ("fork 3", "drawer 2")]
    assert contents("You arrive at shelf 2. On the shelf 2, you see a creditcard 1, and a floorlamp 1.") == [
        ("creditcard 1", "shelf 2"), ("floorlamp 1", "shelf 2")]
    assert contents("You arrive at cabinet 4. The cabinet 4 is closed.") == []


def test_searching_demos_go_where_the_prior_says_until_they_see_what_they_want_and_win(source, cfg):
    """The planner knows where everything is; the searching expert walks the receptacles in the
    prior's order (a function of the task, the room's list and the train games only) until an
    observation shows what it wants, takes it only there, and still wins."""
    from envs.alfworld.search import SearchPrior, contents, kind, room_receptacles

    train = source.tasks("train")
    prior = SearchPrior(train)
    demos = list(envs.demos_by_task("alfworld", source, "train", n=len(train), seed=0, search=True))
    assert sum(d is not None for d in demos) >= len(train) - 1
    searched = 0
    for demo in filter(None, demos):
        assert demo["won"]
        first_take = next(a for a in demo["task"]["walkthrough"] if a.startswith("take "))
        order = prior.order(kind(" ".join(first_take.split()[1:3])), room_receptacles(demo["turns"][0]["observation"]))
        shown, here, route = set(), None, []
        for turn in demo["turns"]:
            shown.update(contents(turn["observation"]))
            action = turn["action"]
            if action.startswith("take "):
                thing, where = " ".join(action.split()[1:3]), action.split(" from ")[1]
                assert (thing, where) in shown and where == here, (action, demo["task"]["walkthrough"])
                if not route or route[-1] is not None:
                    route.append(None)  # the search for the first object is over
            if action.startswith("go to "):
                here = action[6:]
                route.append(here)
        first_search = route[:route.index(None)]
        assert first_search == order[:len(first_search)], (first_search, order)
        searched += first_search[0] != demo["task"]["walkthrough"][0][6:]
    assert searched >= 1  # somewhere the object was not where the search looked first
    stats = envs.spec("alfworld").demo_stats([d for d in demos if d])
    assert stats["mean_turns"] > sum(len(t["walkthrough"]) for t in train) / len(train)


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


# -- a short SFT -> RL run ---------------------------------------------------------------------


def test_short_sft_then_rl_raises_success_on_games_it_did_not_train_on(tmp_path):
    # From scratch, on 48 generated games of the clean task in one small bathroom (FloorPlan420:
    # 8 receptacles, a cloth or a soap bar to clean at the sink basin and put somewhere): SFT on
    # the expert's demos (half with a detour), then a few GRPO iterations, scored on the
    # heldout_seen games (new games of that room: other objects where they lie, other targets;
    # none is a train game), sampled, 4 episodes each. The untrained policy (constrained to
    # admissible commands, so it does play) wins none; SFT -> RL wins some.
    from rl_helpers import tiny_policy

    from algos import recipes
    from algos.checkpoint import load_policy
    from algos.config import load_config
    from algos.data import prepare_data, read_jsonl
    from algos.evaluate import evaluate_episodes
    from algos.rl import train_rl
    from algos.sft import train_sft

    recipe = tmp_path / "aw_tiny.yaml"
    recipe.write_text(f"""
name: aw_tiny
seed: 0
out_dir: {tmp_path / 'rl'}
data_dir: {tmp_path / 'data'}
env: {{name: alfworld, task_types: [pick_clean_then_place_in_recep], train_floor_plans: [420],
      valid_floor_plans: [418], heldout_floor_plans: [402], train_size: 48, heldout_size: 8, max_turns: 15,
      cache_dir: {tmp_path / 'games'}, progress: false, game_time_limit: null}}
tokenizer: {{vocab_size: 400}}
model: {{hidden_size: 64, num_layers: 2, num_heads: 2, max_seq_len: 1024}}
runtime: {{device: cpu}}
sft: {{demos: {{num_examples: 48, mistakes: 0.5}}, steps: 300, batch_size: 4, lr: 3.0e-3, warmup_steps: 5,
      log_every: 50, save_every: 300}}
eval: {{split: heldout_seen, num_tasks: 8}}
rl: {{algo: grpo, init_from: {tmp_path / 'sft'}, iterations: 3, tasks_per_iter: 4, group_size: 4, epochs: 1,
     minibatch_size: 16, micro_batch_size: 8, lr: 3.0e-4, eval_every: 0, eval_samples: 4, save_every: 3}}
rollout: {{num_workers: 0, max_turn_tokens: 20, temperature: 1.0, constrain_actions: true}}
""")
    exp = load_config(recipe)
    source = envs.make_tasks("alfworld", **exp.env_options())
    unseen = source.tasks("heldout_seen")
    assert not {t["game_hash"] for t in unseen} & {t["game_hash"] for t in source.tasks("train")}
    sft_dir = tmp_path / "sft"
    demos = read_jsonl(prepare_data(exp, progress=False) / "train_demos.jsonl")
    assert len(demos) == 48 and all(d["won"] for d in demos)
    tok = recipes.build_tokenizer(exp, demos, sft_dir)
    sampled = exp.eval.model_copy(update={"temperature": 1.0})
    start, _ = evaluate_episodes(tiny_policy(tok, hidden=64).eval(), tok, "alfworld", exp.env_options(), unseen * 4,
                                 sampled, exp.rollout, exp.model.max_seq_len)
    train_sft(exp, recipes.build_examples(exp, demos, tok), tok, sft_dir, progress=False)
    result = train_rl(exp, sft_dir)  # the test split (heldout_seen) before and after RL, sampled too
    before, after = result["before"]["sampled_accuracy"], result["after"]["sampled_accuracy"]
    assert start["accuracy"] == 0.0 and before > 0.0 and after > 0.0, (start["accuracy"], before, after)
    assert result["after"]["tasks/pick_clean_then_place_in_recep"] == 8  # the per-type table's numbers
    sft_weights, rl_weights = load_policy(sft_dir)[0].state_dict(), load_policy(tmp_path / "rl")[0].state_dict()
    assert max(float((rl_weights[k] - sft_weights[k]).abs().max()) for k in sft_weights) > 1e-6
    rows = [r for r in read_jsonl(tmp_path / "rl" / "metrics.jsonl") if "train/policy_loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["train/episodes"] == 16 for r in rows)
