"""The shared env interface: registry, config errors, info keys, task splits."""

import itertools
import random
import subprocess
import sys
from pathlib import Path

import pytest
from gymnasium.spaces import Text
from pydantic import BaseModel

import envs
from envs import EnvConfigError, TaskSource, TextEnv

SMALL = {"num_inputs": 3, "train_size": 200, "heldout_size": 50}
# Every env the project ships, with a config small enough for a test (TextWorld generates games).
SHIPPED = ["countdown", "countdown_search", "textworld"]


def small_config(name: str, tmp_path_factory) -> dict:
    if name == "textworld":
        pytest.importorskip("textworld")
        cache = tmp_path_factory.getbasetemp() / "tw-contract"  # shared: games are made once
        return {"train_size": 2, "heldout_size": 1, "cache_dir": str(cache), "progress": False}
    return SMALL


def test_every_shipped_env_is_registered():
    assert set(SHIPPED) <= set(envs.list_envs())


def test_countdown_envs_are_registered():
    assert {"countdown", "countdown_search"} <= set(envs.list_envs())


def test_unknown_env_lists_known_names():
    with pytest.raises(EnvConfigError) as e:
        envs.make("countdwn")
    msg = str(e.value)
    assert "countdwn" in msg and "'countdown'" in msg and "countdown_search" in msg


def test_unknown_key_names_closest_valid_key():
    with pytest.raises(EnvConfigError) as e:
        envs.make("countdown", num_input=3)
    msg = str(e.value)
    assert "countdown" in msg and "'num_input'" in msg and "did you mean 'num_inputs'" in msg


def test_unknown_key_for_single_turn_env_mentions_search_only_key():
    # max_turns exists only on countdown_search
    with pytest.raises(EnvConfigError, match="max_turns"):
        envs.make("countdown", max_turns=3)


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"min_number": 50, "max_number": 10}, "min_number"),
        ({"min_target": 90, "max_target": 20}, "min_target"),
        ({"num_inputs": 9}, "num_inputs"),
        ({"num_inputs": 1}, "num_inputs"),
        ({"train_size": -1}, "train_size"),
        ({"heldout_size": -5}, "heldout_size"),
        ({"unseen_target_frac": 1.0}, "unseen_target_frac"),
        ({"reward_density": "medium"}, "reward_density"),
    ],
)
def test_bad_values_name_the_field(bad, field):
    with pytest.raises(EnvConfigError) as e:
        envs.make("countdown_search", **bad)
    assert field in str(e.value)
    assert isinstance(e.value, ValueError)


def test_config_classes_are_plain_pydantic_models_that_embed():
    cfg_cls = envs.config_class("countdown_search")
    assert issubclass(cfg_cls, BaseModel)
    assert cfg_cls.model_config.get("extra") == "forbid"

    class Experiment(BaseModel):
        env: cfg_cls

    exp = Experiment(env={"num_inputs": 3, "reward_density": "dense"})
    assert exp.env.num_inputs == 3
    env = envs.make("countdown_search", exp.env)  # a validated config object also works
    assert env.config.reward_density == "dense"


@pytest.mark.parametrize("name", SHIPPED)
def test_env_contract(name, tmp_path_factory):
    cfg = small_config(name, tmp_path_factory)
    env = envs.make(name, **cfg)
    assert isinstance(env, TextEnv)
    assert isinstance(env.observation_space, Text) and isinstance(env.action_space, Text)
    assert "\n" in env.observation_space.character_set
    task = envs.make_tasks(name, **cfg).tasks("train")[0]
    obs, info = env.reset(seed=0, options={"task": task})
    assert isinstance(obs, str) and obs
    assert env.observation_space.contains(obs)
    for key in envs.REQUIRED_INFO_KEYS:
        assert key in info
    obs, reward, terminated, truncated, info = env.step("not an answer at all")
    assert isinstance(obs, str) and isinstance(reward, float)
    assert isinstance(terminated, bool) and isinstance(truncated, bool)
    assert info["won"] is False and info["infra_error"] is False
    assert isinstance(info["reward_components"], dict)
    assert all(isinstance(v, float) for v in info["reward_components"].values())
    assert isinstance(info["admissible_actions"], list)


@pytest.mark.parametrize("name", SHIPPED)
def test_task_splits_deterministic_pairwise_disjoint_with_a_valid_split(name, tmp_path_factory):
    cfg = small_config(name, tmp_path_factory)
    source = envs.make_tasks(name, **cfg)
    assert isinstance(source, TaskSource)
    splits = source.splits()
    assert splits[0] == "train" and "valid" in splits and len(splits) >= 3
    again = envs.make_tasks(name, **cfg)
    keys = {}
    for split in splits:
        tasks = source.tasks(split)
        assert tasks == again.tasks(split)
        assert tasks, split
        keys[split] = {source.task_key(t) for t in tasks}
    for a, b in itertools.combinations(splits, 2):
        assert not keys[a] & keys[b], (a, b)
    # RL draws its train tasks through sample_tasks: never a valid or test task
    drawn = {source.task_key(t) for t in source.sample_tasks("train", 200, random.Random(0))}
    for split in source.heldout_splits():
        assert not drawn & keys[split], split


@pytest.mark.parametrize("name", SHIPPED)
def test_each_env_registers_its_format_and_demo_options(name):
    spec = envs.spec(name)
    assert isinstance(spec.format, envs.Format) and envs.format_for(name) is spec.format
    assert issubclass(spec.demo_options, envs.DemoOptions) and spec.demos is not None
    assert "mistakes" in spec.demo_options.model_fields
    hint = "Valid keys here: mistakes$" if name == "textworld" else "did you mean 'beams'"
    with pytest.raises(EnvConfigError, match=rf"{name} demonstration options: unknown key 'beam'.*{hint}"):
        envs.validate_demo_options(name, {"beam": [1]})


def test_unknown_split_is_an_error():
    with pytest.raises(KeyError, match="heldout_seen"):
        envs.make_tasks("countdown", **SMALL).tasks("validation")


def test_envs_do_not_import_model_or_cluster_libraries():
    code = (
        "import sys, envs; "
        "heavy = [m for m in ('torch', 'transformers', 'ray') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)
