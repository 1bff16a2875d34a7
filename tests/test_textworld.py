"""The TextWorld env: generated games (cached, split by seed), rewards, demos, user folders.

Generates ~10 tiny games once per session (about 15 s on one core) into a temporary cache.
"""

import hashlib
import json
import random
import shutil

import pytest

pytest.importorskip("textworld")

import envs  # noqa: E402
from envs import EnvConfigError  # noqa: E402
from envs.textworld import (  # noqa: E402
    BLOCKED_REPLY,
    TextWorldTasks,
    command_from_action,
    flatten_demo,
    generate_one,
    load_games,
    parse_complexity,
    replay_walkthrough,
)
from envs.textworld.generate import stem  # noqa: E402

COMPLEXITY = "w2-o3-q4"


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tw_cache")


@pytest.fixture(scope="session")
def cfg(cache):
    return {"complexity": COMPLEXITY, "train_size": 3, "heldout_size": 2,
            "cache_dir": str(cache), "progress": False}


@pytest.fixture(scope="session")
def source(cfg, cache):
    folder = cache / COMPLEXITY
    folder.mkdir(parents=True)
    # Seed 1 is already known as dropped: the train split must skip it, not regenerate it.
    (folder / f"{stem(1)}.dropped.json").write_text(json.dumps(
        {"seed": 1, "status": "stalled", "reason": "planted by the test"}))
    src = envs.make_tasks("textworld", cfg)
    src.tasks("train")
    return src


@pytest.fixture(scope="session")
def simple_task(cache):
    """One tw-simple game: 7 points, so dense rewards come in several payments."""
    src = envs.make_tasks("textworld", complexity="tw-simple", train_size=1, heldout_size=0,
                          cache_dir=str(cache), progress=False)
    return src.tasks("train")[0]


def play(env, task, actions):
    obs, info = env.reset(options={"task": task})
    steps = [env.step(a) for a in actions]
    return obs, info, steps


# -- generation, cache, splits ------------------------------------------------------------------


def test_splits_have_the_configured_sizes_and_skip_dropped_seeds(source):
    train, heldout, valid = source.tasks("train"), source.tasks("heldout"), source.tasks("valid")
    assert len(train) == 3 and len(heldout) == 2 and len(valid) == 2
    assert 1 not in [t["seed"] for t in train]
    assert [t["seed"] for t in train] == sorted(t["seed"] for t in train)
    assert all(1_000_000 <= t["seed"] < 2_000_000 for t in heldout)
    assert all(t["seed"] >= 2_000_000 for t in valid)
    assert all(t["seed"] < 1_000_000 for t in train)
    kept = sum(r.kept for r in source.reports)
    assert source.generated == kept + sum(r.dropped for r in source.reports) > 0
    assert not (source.folder / f"{stem(1)}.z8").exists()  # the dropped seed was not rebuilt


def test_no_two_splits_share_a_game_and_rl_draws_only_train_games(source):
    keys = {split: {source.task_key(t) for t in source.tasks(split)} for split in source.splits()}
    assert source.splits() == ["train", "valid", "heldout"] and source.heldout_splits() == ["valid", "heldout"]
    assert [len(k) for k in keys.values()] == [3, 2, 2]
    assert not keys["train"] & keys["heldout"] and not keys["train"] & keys["valid"]
    assert not keys["valid"] & keys["heldout"]
    games = {split: {t["game"] for t in source.tasks(split)} for split in source.splits()}
    assert not games["train"] & (games["valid"] | games["heldout"])
    # sample_tasks is what RL draws its train tasks from
    drawn = {source.task_key(t) for t in source.sample_tasks("train", 30, random.Random(0))}
    assert drawn == keys["train"]


def test_valid_skips_a_game_that_train_or_heldout_holds(source, cfg, tmp_path):
    # Plant train's first game as the first valid seed (two seeds that give one game): valid must
    # pass over it, so tuning never reads a game that RL trains on.
    shutil.copytree(source.folder, tmp_path / COMPLEXITY)
    folder, first_valid = tmp_path / COMPLEXITY, source.tasks("valid")[0]["seed"]
    train_game = source.tasks("train")[0]
    meta = json.loads((folder / f"{stem(train_game['seed'])}.meta.json").read_text())
    shutil.copy(folder / f"{stem(train_game['seed'])}.z8", folder / f"{stem(first_valid)}.z8")
    (folder / f"{stem(first_valid)}.meta.json").write_text(json.dumps({**meta, "seed": first_valid}))
    planted = envs.make_tasks("textworld", {**cfg, "cache_dir": str(tmp_path)})
    valid = planted.tasks("valid")
    assert first_valid not in [t["seed"] for t in valid] and len(valid) == 2
    assert train_game["game_hash"] not in {t["game_hash"] for t in valid}
    assert planted.tasks("train") == [{**t, "game": t["game"].replace(str(source.folder), str(folder))}
                                      for t in source.tasks("train")]


def test_same_seed_gives_the_same_game(source, tmp_path):
    task = source.tasks("train")[0]
    again = generate_one(COMPLEXITY, task["seed"], str(tmp_path))
    assert again["status"] == "kept"
    assert again["walkthrough"] == task["walkthrough"]
    assert again["game_hash"] == task["game_hash"]
    original = json.loads((source.folder / f"{stem(task['seed'])}.json").read_text())
    regenerated = json.loads((tmp_path / f"{stem(task['seed'])}.json").read_text())
    assert original == regenerated
    digest = [hashlib.sha256(p.read_bytes()).hexdigest()
              for p in (source.folder / f"{stem(task['seed'])}.z8", tmp_path / f"{stem(task['seed'])}.z8")]
    assert digest[0] == digest[1]


def test_second_run_reuses_the_cache(source, cfg):
    again = envs.make_tasks("textworld", cfg)
    for split in ("heldout", "train"):
        assert again.tasks(split) == source.tasks(split)
    assert again.generated == 0 and again.reports == []


def test_walkthrough_replays_win_every_kept_game(source):
    env = envs.make("textworld", complexity=COMPLEXITY)
    for task in source.tasks("train") + source.tasks("heldout"):
        assert replay_walkthrough(task["game"], task["walkthrough"])["status"] == "kept"
        _, _, steps = play(env, task, task["walkthrough"])
        obs, reward, terminated, truncated, info = steps[-1]
        assert info["won"] and terminated and not truncated and reward == 1.0, task["id"]
        assert "*** The End ***" in obs


def test_a_parser_question_counts_as_a_stall(source):
    game = source.tasks("train")[0]["game"]
    check = replay_walkthrough(game, ["restart"])  # Inform asks "Are you sure ...?"
    assert check["status"] == "stalled" and "parser question" in check["reason"]
    assert replay_walkthrough(game, ["look"])["status"] == "failed"


def test_stalled_games_are_dropped_counted_and_remembered(tmp_path, monkeypatch):
    import envs.textworld.generate as gen

    def stall(z8_path, walkthrough):
        return {"status": "stalled", "reason": "parser question (simulated)", "steps": 1}

    monkeypatch.setattr(gen, "replay_walkthrough", stall)
    cache = gen.GameCache(envs.textworld.parse_complexity(COMPLEXITY), tmp_path)
    report = cache.generate([7], workers=1, progress=False)
    assert (report.generated, report.kept, report.stalled, report.dropped) == (1, 0, 1, 1)
    assert "1 stalled" in str(report) and "games/s" in str(report)
    folder = tmp_path / COMPLEXITY
    assert json.loads((folder / f"{stem(7)}.dropped.json").read_text())["status"] == "stalled"
    assert not list(folder.glob("*.z8")) and not list(folder.glob(".seed*"))
    again = gen.GameCache(envs.textworld.parse_complexity(COMPLEXITY), tmp_path)
    assert again.generate([7], progress=False).generated == 0


# -- the env -----------------------------------------------------------------------------------


def test_first_observation_and_info_keys(source):
    env = envs.make("textworld", complexity=COMPLEXITY, admissible_commands=True)
    obs, info = env.reset(options={"task": source.tasks("heldout")[0]})
    for key in envs.REQUIRED_INFO_KEYS + ("lost", "score", "max_score", "intermediate_reward"):
        assert key in info
    assert info["objective"] and obs.startswith(info["objective"])
    assert "-= " in obs  # the room description
    last = obs.splitlines()[-1]
    assert last.startswith("Admissible commands: ") and "look" in last
    assert "look" in info["admissible_actions"] and info["max_turns"] == 12
    assert env.observation_space.contains(obs)


def test_show_objective_repeats_the_goal_after_each_reply_until_the_end(source):
    task = source.tasks("train")[0]
    plain = envs.make("textworld", complexity=COMPLEXITY)
    shown = envs.make("textworld", complexity=COMPLEXITY, show_objective=True)
    obs_plain, info, steps_plain = play(plain, task, task["walkthrough"])
    obs_shown, _, steps_shown = play(shown, task, task["walkthrough"])
    objective = info["objective"]
    assert objective and obs_shown == obs_plain  # the first observation always has it
    for (reply, *_), (obs, *_, info_step) in zip(steps_plain[:-1], steps_shown[:-1]):
        assert objective not in reply
        assert obs == reply + "\n\n" + objective and not info_step["won"]
    assert steps_shown[-1][4]["won"] and objective not in steps_shown[-1][0]  # none after the win
    demo = next(iter(envs.demonstrations("textworld", source, "train", n=1, show_objective=True)))
    assert all(objective in turn["observation"] for turn in demo["turns"])


def test_unknown_command_gets_the_games_reply_and_the_episode_goes_on(source):
    env = envs.make("textworld", complexity=COMPLEXITY)
    task = source.tasks("train")[0]
    _, _, steps = play(env, task, ["dance wildly", "restart", ""] + task["walkthrough"])
    obs, reward, terminated, truncated, info = steps[0]
    assert obs == "That's not a verb I recognise."
    assert (reward, terminated, truncated, info["won"], info["infra_error"]) == (0.0, False, False, False, False)
    assert steps[1][0] == BLOCKED_REPLY and steps[1][4]["blocked"]
    assert steps[2][0] == "I beg your pardon?"
    assert steps[-1][4]["won"]


def test_policy_garbage_with_control_bytes_is_played_safely(source):
    # Raw policy text once crashed the interpreter (and the whole process) on a control byte,
    # and a leading backslash is an interpreter escape ("\q", "\x" end the process).
    env = envs.make("textworld", complexity=COMPLEXITY)
    task = source.tasks("train")[0]
    garbage = ["m cre over up today\x14ink into\ufffd\ufffd", "\x01\x02", "\\x", "\\q", "\\help", "x" * 5000,
               "look"]
    _, _, steps = play(env, task, garbage)
    assert all(not s[4]["infra_error"] and not s[2] for s in steps)
    assert [s[4]["command"] for s in steps][:5] == ["m cre over up today ink into", "", "x", "q", "help"]
    assert steps[-1][0].startswith("-= ")  # the game still answers: the room's description


def test_max_turns_truncates_then_step_raises(source):
    env = envs.make("textworld", complexity=COMPLEXITY, max_turns=2)
    _, _, steps = play(env, source.tasks("train")[0], ["look", "inventory"])
    assert [s[3] for s in steps] == [False, True] and not steps[-1][2]
    with pytest.raises(RuntimeError):
        env.step("look")


@pytest.mark.parametrize("density", ["sparse", "dense"])
def test_rewards_sum_to_one_on_a_win(simple_task, density):
    env = envs.make("textworld", complexity="tw-simple", reward_density=density)
    _, info, steps = play(env, simple_task, simple_task["walkthrough"])
    assert info["max_score"] > 1
    rewards = [s[1] for s in steps]
    assert steps[-1][4]["won"] and sum(rewards) == 1.0
    running = 0.0
    for r in rewards:
        running += r
        assert running <= 1.0
    if density == "sparse":
        assert rewards[:-1] == [0.0] * (len(rewards) - 1)
    else:
        paid = [r for r in rewards if r > 0]
        assert len(paid) > 2  # several score gains, each paid when it happens
        points = [s[4]["reward_components"]["score"] for s in steps]
        for r, p in zip(rewards[:-1], points[:-1]):
            assert r == pytest.approx(p / info["max_score"], abs=1e-5)


def test_dense_reward_of_an_unfinished_episode_is_below_one(simple_task):
    env = envs.make("textworld", complexity="tw-simple", reward_density="dense")
    _, _, steps = play(env, simple_task, simple_task["walkthrough"][:-1])
    total = sum(s[1] for s in steps)
    assert 0.0 < total < 1.0 and not any(s[4]["won"] for s in steps)


def test_engine_failure_is_an_infra_error(source, monkeypatch):
    env = envs.make("textworld", complexity=COMPLEXITY)
    env.reset(options={"task": source.tasks("train")[0]})

    def broken(command):
        raise OSError("game process died")

    monkeypatch.setattr(env._game, "step", broken)
    obs, reward, terminated, truncated, info = env.step("look")
    assert info["infra_error"] and truncated and not terminated and reward == 0.0
    assert "game process died" in info["error"]


def test_reset_without_a_task_draws_a_train_game(cfg, source):
    env = envs.make("textworld", cfg)
    env.reset(seed=3)
    assert env.task in source.tasks("train")


def test_commands_and_complexity_names_are_normalised():
    assert command_from_action("\n> go south\nand then north") == "go south"
    assert command_from_action("   ") == ""
    assert parse_complexity("W4-O6-Q8").name == "w4-o6-q8"
    assert parse_complexity("tw-cooking").name == "tw-cooking-r1-t1-g6-open-cook-cut"
    assert parse_complexity("tw-simple").name == "tw-simple-dense-detailed"
    assert parse_complexity("w4-o6-q8").default_max_turns == 24


# -- bad settings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, words",
    [
        ({"complexity": "w2-o3-q0"}, ["complexity", "quest length"]),
        ({"complexity": "w0-o3-q4"}, ["complexity", "world size"]),
        ({"complexity": "hard-mode"}, ["complexity", "unknown complexity name", "w{W}-o{O}-q{Q}"]),
        ({"complexity": "tw-cooking-g7"}, ["complexity", "rooms"]),
        ({"workers": 0}, ["workers"]),
        ({"max_turns": 0}, ["max_turns"]),
        ({"train_sizes": 4}, ["train_sizes", "did you mean 'train_size'"]),
    ],
)
def test_bad_settings_name_the_key(bad, words):
    with pytest.raises(EnvConfigError) as e:
        envs.make_tasks("textworld", **bad)
    for word in words:
        assert word in str(e.value)


def test_missing_games_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_games"):
        envs.make_tasks("textworld").tasks_from_file(str(tmp_path / "no_such_games"))


# -- games a user brings -----------------------------------------------------------------------


def test_folder_of_games_as_tasks(source, tmp_path):
    folder = tmp_path / "my_games"
    folder.mkdir()
    originals = source.tasks("heldout")
    for i, task in enumerate(originals):  # as tw-make leaves them: .z8 + .json, no meta
        for ext in (".z8", ".json"):
            shutil.copy(task["game"].removesuffix(".z8") + ext, folder / f"game{i}{ext}")
    tasks = source.tasks_from_file(str(folder))
    assert [t["walkthrough"] for t in tasks] == [t["walkthrough"] for t in originals]
    assert [t["max_score"] for t in tasks] == [t["max_score"] for t in originals]
    assert [source.task_key(t) for t in tasks] == [source.task_key(t) for t in originals]
    env = envs.make("textworld", complexity=COMPLEXITY)
    for task in tasks:
        *_, steps = play(env, task, task["walkthrough"])
        assert steps[-1][4]["won"]
    (folder / "game0.json").unlink()
    with pytest.raises(ValueError, match="game0.json"):
        load_games(folder)


# -- demonstrations ----------------------------------------------------------------------------


def test_demonstrations_are_what_the_env_shows(source, cfg):
    demos = list(envs.demonstrations("textworld", source, "train", n=2, seed=0, admissible_commands=True))
    assert len(demos) == 2
    env = envs.make("textworld", cfg, admissible_commands=True)
    for demo in demos:
        assert demo["won"] and demo["task"]["walkthrough"] == [t["action"] for t in demo["turns"]]
        obs, _ = env.reset(options={"task": demo["task"]})
        for turn in demo["turns"]:
            assert turn["observation"] == obs
            obs, *_ = env.step(turn["action"])
        assert obs == demo["final_observation"]
        text = demo["prompt"] + demo["completion"]
        assert [text[a:b] for a, b in demo["action_spans"]] == [t["action"] for t in demo["turns"]]
        assert demo["prompt"] == demo["turns"][0]["observation"] + "\n> "
        assert flatten_demo(demo)["completion"] == demo["completion"]
        json.dumps(demo)  # JSON-able, for the data cache


def test_detour_demos_recover_and_train_only_on_the_expert(source, cfg):
    from envs import format_for

    def demos_of(**options):
        return list(envs.demonstrations("textworld", source, "train", n=3, seed=0, admissible_commands=True, **options))

    plain, demos = demos_of(), demos_of(mistakes=1.0)
    assert demos == demos_of(mistakes=1.0)
    detoured = [d for d in demos if any(not t.get("expert", True) for t in d["turns"])]
    assert detoured, "mistakes=1.0 gave no detour in 3 games"
    env = envs.make("textworld", cfg, admissible_commands=True)
    for demo, walk in zip(demos, plain):
        assert demo["won"]
        detours = [i for i, t in enumerate(demo["turns"]) if not t.get("expert", True)]
        if not detours:  # the detour lost the game or its recovery ran out of turns
            assert demo == walk
            continue
        (k,) = detours
        walkthrough = demo["task"]["walkthrough"]
        assert [t["action"] for t in demo["turns"][:k]] == walkthrough[:k]
        assert demo["turns"][k]["action"] != walkthrough[k]
        # Replaying the demo's actions in a plain env shows the same text and wins; the detour
        # was an admissible command.
        obs, info = env.reset(options={"task": demo["task"]})
        for i, turn in enumerate(demo["turns"]):
            assert turn["observation"] == obs
            assert i != k or turn["action"] in info["admissible_actions"]
            obs, _, _, _, info = env.step(turn["action"])
        assert info["won"]
        # The detour is context: no action span, and not a policy segment in SFT.
        text = demo["prompt"] + demo["completion"]
        assert [text[a:b] for a, b in demo["action_spans"]] == [
            t["action"] for i, t in enumerate(demo["turns"]) if i != k]
        policy = [text for text, mine in format_for("textworld").segments(demo) if mine]
        assert policy == ["> " + t["action"] + "\n" for i, t in enumerate(demo["turns"]) if i != k]

    with pytest.raises(ValueError, match="mistakes"):
        list(envs.demonstrations("textworld", source, "train", n=1, mistakes=1.5))


def test_tasks_source_class_is_registered():
    assert "textworld" in envs.list_envs()
    assert envs.config_class("textworld")().complexity == "w2-o3-q4"
    assert isinstance(envs.make_tasks("textworld"), TextWorldTasks)


def test_short_sft_then_rl_on_a_tiny_game_set(source, cfg, tmp_path):
    # From scratch on the session's 3 train games (scored on those same games: this is imitation of
    # their walkthroughs, not generalisation; RL's learning is tested on the toy task in
    # test_rl.py): a random policy rarely wins them, SFT wins more, and a few GRPO iterations then
    # really update the policy (weights move, every iteration trains on scored episodes) without
    # undoing what SFT learned.
    from rl_helpers import tiny_policy

    from algos import recipes
    from algos.checkpoint import load_policy
    from algos.config import load_config
    from algos.data import prepare_data, read_jsonl
    from algos.evaluate import evaluate_episodes
    from algos.rl import train_rl
    from algos.sft import train_sft

    recipe = tmp_path / "tw_tiny.yaml"
    recipe.write_text(f"""
name: tw_tiny
seed: 0
out_dir: {tmp_path / 'rl'}
data_dir: {tmp_path / 'data'}
env: {{name: textworld, complexity: {COMPLEXITY}, train_size: 3, heldout_size: 2, admissible_commands: true,
      cache_dir: {cfg['cache_dir']}, progress: false}}
tokenizer: {{vocab_size: 400}}
model: {{hidden_size: 64, num_layers: 2, num_heads: 2, max_seq_len: 1024}}
runtime: {{device: cpu}}
sft: {{demos: {{num_examples: 3}}, steps: 120, batch_size: 3, lr: 3.0e-3, warmup_steps: 5, log_every: 20,
      save_every: 120}}
eval: {{split: heldout}}
rl: {{algo: grpo, init_from: {tmp_path / 'sft'}, iterations: 3, tasks_per_iter: 3, group_size: 4, epochs: 1,
     minibatch_size: 12, micro_batch_size: 6, lr: 3.0e-4, eval_every: 0, eval_tasks: 2, save_every: 3}}
rollout: {{num_workers: 0, max_turn_tokens: 16, temperature: 1.0}}
""")
    exp = load_config(recipe)
    train = source.tasks("train")

    def success(model, tokenizer) -> float:
        summary, _ = evaluate_episodes(model, tokenizer, "textworld", exp.env_options(), train, exp.eval,
                                       exp.rollout, exp.model.max_seq_len)
        return summary["accuracy"]

    sft_dir = tmp_path / "sft"
    demos = read_jsonl(prepare_data(exp, progress=False) / "train_demos.jsonl")
    tok = recipes.build_tokenizer(exp, demos, sft_dir)
    start = success(tiny_policy(tok, hidden=64).eval(), tok)
    train_sft(exp, recipes.build_examples(exp, demos, tok), tok, sft_dir, progress=False)
    after_sft = success(*load_policy(sft_dir))
    train_rl(exp, sft_dir)
    after_rl = success(*load_policy(tmp_path / "rl"))
    assert start < 1 / 3 and after_sft > start and after_rl >= after_sft, (start, after_sft, after_rl)
    sft_weights, rl_weights = load_policy(sft_dir)[0].state_dict(), load_policy(tmp_path / "rl")[0].state_dict()
    moved = max(float((rl_weights[k] - sft_weights[k]).abs().max()) for k in sft_weights)
    assert moved > 1e-6, "RL left the SFT policy unchanged"
    rows = [r for r in read_jsonl(tmp_path / "rl" / "metrics.jsonl") if "train/policy_loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["train/episodes"] == 12 for r in rows)


def test_constrained_decoding_plays_only_admissible_commands(source, cfg, tmp_path):
    # An untrained policy writes garbage commands; with rollout.constrain_actions every command it
    # sends is one the game listed as admissible at that moment (checked by replaying the game),
    # and the learner's log-probs of those tokens are the engine's masked ones.
    import copy

    from rl_helpers import rl_experiment

    from agents.model import ModelConfig, build_model
    from agents.tokenizer import TokenizerConfig, train_tokenizer
    from algos.learner import Learner
    from envs import format_for
    from rollout.engine import TorchEngine
    from rollout.runner import EpisodeRunner, RolloutConfig

    train = source.tasks("train")
    demos = envs.demonstrations("textworld", source, "train", len(train), seed=0, admissible_commands=True)
    tok = train_tokenizer([d["prompt"] + d["completion"] for d in demos] * 5, TokenizerConfig(vocab_size=400))
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    policy = build_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=1, max_seq_len=2048), len(tok),
                         tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
    env_cfg = envs.validate_config("textworld", {**cfg, "admissible_commands": True, "max_turns": 4})
    fmt = format_for("textworld")

    def commands(constrain: bool):
        rollout = RolloutConfig(num_workers=0, max_turn_tokens=12, temperature=1.0, constrain_actions=constrain)
        runner = EpisodeRunner(TorchEngine(policy, tok.pad_token_id), tok, lambda: envs.make("textworld", env_cfg),
                               fmt, rollout, 2048)
        trajs, _ = runner.play(train, group_size=2, seed=1)
        runner.close()
        out = []
        for tr in trajs:
            texts, run = [], []
            for token, by_policy in zip(tr.token_ids + [-1], tr.policy_mask + [0]):  # one turn per run of 1s
                if by_policy:
                    run.append(token)
                elif run:
                    texts.append(tok.decode(run))
                    run = []
            out.append([fmt.action("", t) for t in texts])
        return out, trajs

    def admissible_all(task, actions) -> bool:
        env = envs.make("textworld", env_cfg)
        _, info = env.reset(options={"task": task})
        for action in actions:
            if action not in info["admissible_actions"]:
                return False
            *_, info = env.step(action)
        return True

    free, _ = commands(False)
    assert not all(admissible_all(train[i // 2], a) for i, a in enumerate(free))
    constrained, trajs = commands(True)
    assert all(len(a) >= 1 for a in constrained)
    assert all(admissible_all(train[i // 2], a) for i, a in enumerate(constrained))

    def logp_gap() -> float:  # PPO's no-grad pass: mean |log π_old − log μ| over policy tokens
        exp = rl_experiment(tmp_path, algo="ppo", group_size=2, minibatch_size=4, micro_batch_size=2)
        return Learner(exp, copy.deepcopy(policy), tok.pad_token_id).update(trajs)["logp_gap"]

    assert logp_gap() < 1e-4
    for tr in trajs:  # an unmasked learner would see a different distribution
        tr.choice_sets = {}
    assert logp_gap() > 1e-2


def test_timed_play_wins_every_game_by_its_walkthrough_and_counts_its_steps(source, cfg):
    # the env-speed bench of the text games (python -m envs.textworld bench-play) plays through this
    from envs.base import timed_play

    tasks = source.tasks("train")
    env = envs.make("textworld", cfg)
    try:
        played = timed_play(env, tasks, follow_walkthrough=True)
        random_play = timed_play(env, tasks[:1], follow_walkthrough=False)
    finally:
        env.close()
    assert played["episodes"] == len(tasks) and played["won"] == len(tasks)
    assert played["steps"] == sum(len(t["walkthrough"]) for t in tasks)
    assert random_play["steps"] >= 1 and played["steps_per_s"] > 0
