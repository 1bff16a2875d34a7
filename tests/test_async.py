"""rollout.mode=async: the workers play the next iteration while the learner updates, every turn
records the policy version that sampled it, and no episode older than rollout.max_staleness
updates reaches the learner (older ones are dropped and counted)."""
from __future__ import annotations

import json
import os

import pytest
from conftest import REPO
from rl_helpers import rl_experiment, tiny_policy, tiny_tokenizer

from algos.config import ConfigError, load_config
from algos.learner import Learner

pytest.importorskip("ray")


@pytest.fixture(scope="module", autouse=True)
def _ray_with_the_toy_env():
    """A local Ray whose workers know the tests' toy env (their setup hook imports rl_helpers)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ["RAY_worker_niceness"] = "0"
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, namespace="turnstile",
             runtime_env={"env_vars": {"PYTHONPATH": f"{REPO / 'tests'}:{REPO}"},
                          "worker_process_setup_hook": "rl_helpers.register_toy_env"})
    yield
    ray.shutdown()


def _policy_folder(tmp_path):
    tok = tiny_tokenizer()
    folder = tmp_path / "policy"
    tiny_policy(tok, seed=0).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _async_experiment(tmp_path, **rl):
    exp = rl_experiment(tmp_path, iterations=4, save_every=4, tasks_per_iter=2, group_size=4, minibatch_size=8,
                        micro_batch_size=8, **rl)
    exp.rollout.num_workers, exp.rollout.threads_per_worker = 2, 1
    exp.rollout.mode, exp.rollout.max_staleness = "async", 1
    return exp


def _record_updates(monkeypatch) -> list[list[int]]:
    """Per learner update: the oldest policy version of each episode it was given."""
    seen, real = [], Learner.update

    def recording(self, trajs, seed=0):
        seen.append([t.staleness_base for t in trajs])
        return real(self, trajs, seed)

    monkeypatch.setattr(Learner, "update", recording)
    return seen


def _train_metrics(exp) -> list[dict]:
    rows = [json.loads(x) for x in (exp.out_dir and open(f"{exp.out_dir}/metrics.jsonl")).read().splitlines()]
    return [r for r in rows if "train/mean_return" in r]


def test_async_plays_one_iteration_ahead_with_the_previous_weights(tmp_path, monkeypatch):
    from algos.rl import train_rl

    seen = _record_updates(monkeypatch)
    exp = _async_experiment(tmp_path)
    out = train_rl(exp, _policy_folder(tmp_path))
    assert set(out) == {"before", "after"}
    # iteration 0 is played by the start policy (version 0); iteration i ≥ 1 was submitted before
    # update i-1 was pushed, so it played version i-1 while the learner, at version i, waited
    assert [sorted(set(v)) for v in seen] == [[0], [0], [1], [2]]
    assert all(len(v) == 8 for v in seen) and all(r["train/stale_dropped"] == 0 for r in _train_metrics(exp))


def test_episodes_older_than_the_bound_never_reach_the_learner(tmp_path, monkeypatch):
    from algos.rl import train_rl
    from rollout.worker import RolloutPool

    real_push = RolloutPool.update_weights

    def a_pool_that_falls_behind(pool, state_dict, version=None, wait=True):
        if version is not None and version >= 2:  # the workers never get versions 2 and 3
            return 0.0
        return real_push(pool, state_dict, version, wait)

    monkeypatch.setattr(RolloutPool, "update_weights", a_pool_that_falls_behind)
    seen = _record_updates(monkeypatch)
    exp = _async_experiment(tmp_path)
    train_rl(exp, _policy_folder(tmp_path))
    # iteration 3 is played by version 1 (two behind the learner's 3): all its episodes are dropped
    assert [sorted(set(v)) for v in seen] == [[0], [0], [1], []]
    assert [r["train/stale_dropped"] for r in _train_metrics(exp)] == [0, 0, 0, 8]
    assert all(it - base <= 1 for it, bases in enumerate(seen) for base in bases)


def test_async_needs_ray_workers(tiny_recipe):
    with pytest.raises(ConfigError, match="rollout.mode=async needs rollout.num_workers ≥ 1"):
        load_config(tiny_recipe, ["rollout.num_workers=0", "+rollout.mode=async"])
