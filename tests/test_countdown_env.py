"""The Countdown environments: single-turn stream env and multi-turn search env."""

import random

import pytest

import envs
from envs.countdown import (
    CountdownConfig,
    CountdownTasks,
    demonstrations,
    dfs_stream,
    optimal_stream,
)
from envs.countdown.env import stream_to_actions

TASK = {"numbers": [42, 61, 66], "target": 47}  # solution: 61-42=19, 66-19=47


def search_env(**cfg):
    env = envs.make("countdown_search", **cfg)
    obs, info = env.reset(options={"task": TASK})
    return env, obs, info


def play(env, actions):
    """Step through actions; returns the list of step results."""
    return [env.step(a) for a in actions]


def problems(num_inputs, n):
    return CountdownTasks(CountdownConfig(num_inputs=num_inputs, heldout_size=n)).problems(
        "heldout_seen"
    )


# -- single turn ------------------------------------------------------------------------------


@pytest.mark.parametrize("density", ["sparse", "dense"])
def test_stream_env_rewards_a_valid_stream(density):
    env = envs.make("countdown", reward_density=density)
    obs, info = env.reset(options={"task": TASK})
    assert obs == "Current State: 47:[42, 61, 66], Operations: []"
    stream = dfs_stream(TASK["numbers"], TASK["target"])
    completion = stream.split("\n", 1)[1]  # the model continues after the prompt line
    obs, reward, terminated, truncated, info = env.step(completion)
    assert (reward, terminated, truncated, info["won"]) == (1.0, True, False, True)
    assert info["reward_components"] == {"goal": 1.0}
    assert info["operations"] == ["61-42=19", "66-19=47"]
    with pytest.raises(RuntimeError):
        env.step(completion)


def test_stream_env_rejects_bad_streams_with_reason():
    env = envs.make("countdown")
    for bad in ["", "no idea", optimal_stream([42, 61, 66], 47, ["61-42=19", "66-19=46"])]:
        env.reset(options={"task": TASK})
        obs, reward, terminated, _, info = env.step(bad)
        assert reward == 0.0 and terminated and not info["won"]
        assert info["reason"] and info["reason"] in obs


@pytest.mark.parametrize("format", ["sos", "optimal"])
def test_demonstrations_are_what_the_stream_env_rewards(format):
    env = envs.make("countdown")
    demos = list(demonstrations(problems(3, 40), format, seed=1))
    assert demos == list(demonstrations(problems(3, 40), format, seed=1))
    assert any(d["goal_reached"] for d in demos)
    for demo in demos:
        obs, _ = env.reset(options={"task": demo["problem"]})
        assert obs == demo["prompt"]
        *_, info = env.step(demo["completion"])
        assert info["won"] == demo["goal_reached"], info["reason"]
    if format == "optimal":
        assert all(d["goal_reached"] for d in demos)


# -- multi turn: transitions ------------------------------------------------------------------


def test_win_path():
    env, obs, info = search_env()
    assert obs == "Current State: 47:[42, 61, 66], Operations: []"
    assert "61-42=19" in info["admissible_actions"]
    (obs1, r1, t1, tr1, i1), (obs2, r2, t2, tr2, i2) = play(env, ["61-42=19", "66-19=47"])
    assert obs1.splitlines() == [
        "Exploring Operation: 61-42=19, Resulting Numbers: [66, 19]",
        "Generated Node #0,0: 47:[66, 19] Operation: 61-42=19",
        "Moving to Node #0,0",
        "Current State: 47:[66, 19], Operations: ['61-42=19']",
    ]
    assert (r1, t1, tr1, i1["won"]) == (0.0, False, False, False)
    assert i1["reward_components"]["valid"] == 1.0 and i1["reward_components"]["reachable"] == 1.0
    assert obs2.splitlines()[-1] == "47,47 equal: Goal Reached"
    assert (r2, t2, tr2, i2["won"]) == (1.0, True, False, True)
    assert i2["reward_components"]["goal"] == 1.0
    assert i2["admissible_actions"] == []
    with pytest.raises(RuntimeError):
        env.step("66-19=47")


def test_tolerates_prefix_and_missing_result():
    env, _, _ = search_env()
    obs, *_ = env.step("Exploring Operation: 61 - 42")
    assert "Generated Node #0,0: 47:[66, 19]" in obs
    *_, info = env.step("66-19=47, Resulting Numbers: [47]\nextra lines are ignored")
    assert info["won"]


def test_dead_end_then_backtrack():
    env, _, _ = search_env(max_backtracks=2)
    play(env, ["66-42=24"])  # node 0,0 = [61, 24]: the target is no longer reachable
    obs, reward, terminated, truncated, info = env.step("61-24=37")
    assert obs.splitlines() == ["Exploring Operation: 61-24=37, Resulting Numbers: [37]",
                                "37,47 unequal: No Solution"]
    assert not terminated and not truncated and info["dead_end"] and info["node"] is None
    assert info["reward_components"]["reachable"] == 0.0
    assert info["admissible_actions"] == ["Moving to Node #0", "Moving to Node #0,0"]
    # an operation is refused until the agent moves back
    obs, _, terminated, _, info = env.step("61+24=85")
    assert "dead end" in obs and not terminated and info["reward_components"]["valid"] == 0.0
    obs, _, terminated, _, info = env.step("Moving to Node #0")
    assert obs == "Current State: 47:[42, 61, 66], Operations: []"
    assert info["backtracks_left"] == 1 and info["reward_components"]["valid"] == 1.0
    # node numbers count every move tried at a node, dead ends included (the paper's DFS)
    obs, *_ = env.step("61-42=19")
    assert "Generated Node #0,1:" in obs
    *_, info = env.step("66-19=47")
    assert info["won"]


def test_dead_end_without_backtracks_ends_the_episode():
    env, _, _ = search_env(max_backtracks=0)
    play(env, ["66-42=24"])
    obs, reward, terminated, truncated, info = env.step("61-24=37")
    assert terminated and not truncated and not info["won"] and reward == 0.0
    assert "No backtracks left" in obs


def test_backtrack_budget_is_spent_by_moves():
    env, _, _ = search_env(max_backtracks=1)
    play(env, ["66-42=24"])
    _, _, _, _, info = env.step("Moving to Node #0")
    assert info["backtracks_left"] == 0
    assert not any(a.startswith("Moving") for a in info["admissible_actions"])
    obs, _, terminated, _, info = env.step("Moving to Node #0,0")
    assert "no backtracks left" in obs and not terminated
    assert info["reward_components"]["valid"] == 0.0 and info["node"] == "0"


def test_turn_limit_truncates():
    env, _, _ = search_env(max_turns=3)
    results = play(env, ["66-42=24", "nonsense", "Moving to Node #0"])
    assert [(t, tr) for _, _, t, tr, _ in results] == [(False, False), (False, False),
                                                        (False, True)]
    with pytest.raises(RuntimeError):
        env.step("61-42=19")


def test_win_on_the_last_turn_is_terminated_not_truncated():
    env, _, _ = search_env(max_turns=2)
    _, reward, terminated, truncated, info = play(env, ["61-42=19", "66-19=47"])[-1]
    assert (reward, terminated, truncated, info["won"]) == (1.0, True, False, True)


@pytest.mark.parametrize(
    "action, why",
    [
        ("hello there", "neither an operation"),
        ("", "empty line"),
        ("42+99=141", "uses 99"),
        ("42+42=84", "uses 42 twice"),
        ("61+42=100", "wrong arithmetic: 61+42 is 103, not 100"),
        ("42-61=-19", "smaller number from the larger"),
        ("66/42", "not an exact division"),
        ("Moving to Node #0,7", "there is no Node #0,7"),
    ],
)
def test_invalid_actions_explain_and_keep_the_episode(action, why):
    env, start, _ = search_env()
    obs, reward, terminated, truncated, info = env.step(action)
    assert obs.startswith("Invalid action:") and why in obs
    assert obs.endswith(start)  # restates where the agent is
    assert (reward, terminated, truncated) == (0.0, False, False)
    assert info["reward_components"]["valid"] == 0.0 and info["turn"] == 1
    *_, info = play(env, ["61-42=19", "66-19=47"])[-1]
    assert info["won"]  # still playable


def test_every_admissible_action_is_accepted():
    env, _, info = search_env()
    play(env, ["66-42=24", "61-24=37"])  # a dead end, so moves are admissible
    env.step("Moving to Node #0")
    actions = env.admissible_actions()
    assert any(a.startswith("Moving") for a in actions) and len(actions) > 5
    for action in actions:
        fresh, _, _ = search_env()
        play(fresh, ["66-42=24", "61-24=37", "Moving to Node #0"])
        *_, info = fresh.step(action)
        assert info["reward_components"]["valid"] == 1.0, action


def test_reset_without_task_draws_a_train_problem_from_the_seed():
    env = envs.make("countdown_search", num_inputs=3, heldout_size=20)
    obs_a, info_a = env.reset(seed=11)
    obs_b, _ = env.reset(seed=11)
    obs_c, _ = env.reset(seed=12)
    assert obs_a == obs_b != obs_c
    assert info_a["problem"]["solvable"] and len(info_a["problem"]["numbers"]) == 3


@pytest.mark.parametrize("num_inputs", [3, 4])
def test_dfs_streams_replay_as_actions(num_inputs):
    """The env speaks the stream's language: a DFS stream replays turn by turn and wins."""
    for p in problems(num_inputs, 25):
        stream = dfs_stream(p.numbers, p.target, "sum")
        if "Goal Reached" not in stream:
            continue
        env = envs.make("countdown_search", max_turns=10**6, max_backtracks=10**6)
        env.reset(options={"task": p.to_dict()})
        for action in stream_to_actions(stream):
            *_, info = env.step(action)
            assert info["reward_components"]["valid"] == 1.0, action
        assert info["won"]


# -- rewards ----------------------------------------------------------------------------------


def test_dense_rewards_on_a_win_sum_to_exactly_one():
    env, _, _ = search_env(reward_density="dense")
    rewards = [r for _, r, *_ in play(env, ["61-42=19", "66-19=47"])]
    assert rewards[0] == pytest.approx(0.25)  # depth 1 of 2, half the budget for progress
    assert sum(rewards) == 1.0 and rewards[-1] == 1.0 - rewards[0]


def test_dense_pays_progress_only_on_reachable_new_depth():
    env, _, _ = search_env(reward_density="dense", max_backtracks=5)
    rewards = [r for _, r, *_ in play(env, [
        "66-42=24",  # target unreachable from [61, 24]: no progress
        "Moving to Node #0",
        "61-42=19",  # reachable at depth 1: paid
        "Moving to Node #0",
        "61-42=19",  # same depth again: not paid twice
    ])]
    assert rewards == [0.0, 0.0, pytest.approx(0.25), 0.0, 0.0]


@pytest.mark.parametrize("num_inputs", [3, 4])
def test_random_play_dense_at_most_one_and_equal_to_sparse_at_the_end_of_a_win(num_inputs):
    rng = random.Random(num_inputs)
    wins = 0
    for p in problems(num_inputs, 60):
        totals, seed = {}, rng.random()
        for density in ("sparse", "dense"):
            env = envs.make("countdown_search", reward_density=density, max_turns=30,
                            max_backtracks=10)
            _, info = env.reset(options={"task": p.to_dict()})
            episode_rng = random.Random(seed)  # same actions under both densities
            total, done, step_rewards = 0.0, False, []
            while not done:
                # mostly admissible actions, sometimes the solution, sometimes garbage
                roll = episode_rng.random()
                if roll < 0.1:
                    action = "garbage"
                elif roll < 0.5 and env.current is not None:
                    node = env.nodes[env.current]
                    done_ops = len(node.ops)
                    action = (p.solution[done_ops] if node.ops == list(p.solution[:done_ops])
                              else episode_rng.choice(info["admissible_actions"]))
                else:
                    action = episode_rng.choice(info["admissible_actions"])
                _, reward, terminated, truncated, info = env.step(action)
                step_rewards.append(reward)
                total += reward
                done = terminated or truncated
            assert all(r >= 0.0 for r in step_rewards)
            assert total <= 1.0
            if info["won"]:
                assert total == 1.0 and step_rewards[-1] > 0.0
            else:
                assert total < 0.5 if density == "dense" else total == 0.0
            totals[density] = (info["won"], total)
        wins += totals["dense"][0]
        # the two densities see the same actions, so they win together and then agree
        assert totals["sparse"][0] == totals["dense"][0]
        if totals["dense"][0]:
            assert totals["sparse"][1] == totals["dense"][1] == 1.0
    assert wins > 5


# -- demonstrations with a rejected move --------------------------------------------------------


def test_mistake_demos_read_exactly_like_multi_turn_play():
    """A demo with a rejected move spliced in is what the multi-turn env and its format write
    when the policy plays the demo's lines, wrong one included; SFT trains on the stream around
    it but not on the wrong line or the env's reply, and the stream itself is unchanged."""
    from envs import format_for

    fmt = format_for("countdown_search")
    probs = CountdownTasks(CountdownConfig(num_inputs=3, max_number=10, heldout_size=60)).problems("heldout_seen")
    plain = list(demonstrations(probs, strategies=["dfs"], heuristics=["sum"], seed=3))
    spoiled = list(demonstrations(probs, strategies=["dfs"], heuristics=["sum"], seed=3, mistakes=1.0))
    assert [d["completion"] for d in plain] == [d["completion"] for d in spoiled]
    with_segments = [d for d in spoiled if "segments" in d and "Goal Reached" in d["completion"]]
    assert len(with_segments) >= 50  # DFS streams almost always have a line to spoil
    wrong_arithmetic = 0
    for demo in with_segments:
        text = "".join(t for t, _ in demo["segments"])
        untrained = [t for t, trained in demo["segments"] if not trained]
        assert untrained[0] == demo["prompt"] + "\n" and untrained[2].startswith("Invalid action:")
        wrong_arithmetic += "wrong arithmetic" in untrained[2]
        trained = "".join(t for t, trained in demo["segments"] if trained)
        assert trained == demo["completion"]
        # play it: each turn the policy writes the next line of the demo
        env = envs.make("countdown_search", max_turns=10**6, max_backtracks=10**6)
        obs, _ = env.reset(options={"task": demo["problem"]})
        conversation = fmt.prompt(obs)
        while True:
            line = text[len(conversation):].split("\n")[0]
            obs, _, terminated, _, info = env.step(fmt.action(obs, line))
            conversation += line + "\n" + fmt.observation(obs, fmt.action(obs, line), line)
            if terminated:
                break
            assert text.startswith(conversation)
        assert conversation == text + "\n" and info["won"]
    assert wrong_arithmetic > len(with_segments) // 2


def test_mistakes_outside_zero_one_are_refused():
    probs = CountdownTasks(CountdownConfig(num_inputs=3, heldout_size=5)).problems("heldout_seen")
    with pytest.raises(ValueError, match="mistakes"):
        list(demonstrations(probs, mistakes=1.5))
