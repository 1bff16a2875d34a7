"""Rollout workers: the in-process runner and Ray workers play the same episodes from the same seeds."""
from __future__ import annotations

import pytest
from rl_helpers import tiny_policy, tiny_tokenizer

from rollout.runner import RolloutConfig

ENV = {"num_inputs": 3, "max_number": 20, "max_turns": 3}
TASKS = [{"numbers": [3, 4, 5], "target": 27}, {"numbers": [2, 9, 9], "target": 11},
         {"numbers": [1, 5, 7], "target": 12}]


def _spec(tmp_path):
    from rollout.worker import WorkerSpec

    tok = tiny_tokenizer()
    folder = tmp_path / "policy"
    tiny_policy(tok, seed=0).save_pretrained(folder)
    tok.save_pretrained(folder)
    return WorkerSpec(policy_folder=str(folder), env_name="countdown_search", env_options=ENV, max_episode_tokens=256)


def _episodes(pool, seed):
    trajs, _ = pool.play(TASKS, group_size=2, seed=seed, temperature=1.0)
    return [(t.group, t.token_ids, [round(x, 5) for x in t.logprobs]) for t in trajs]


def test_one_ray_worker_samples_exactly_what_in_process_play_samples(tmp_path):
    """num_workers 0 and 1 are the same code path with the same seeds: sampled (not greedy) episodes
    agree token for token, and a different seed gives different episodes (sampling is live)."""
    pytest.importorskip("ray")
    from rollout.worker import RayConfig, RolloutPool

    spec = _spec(tmp_path)
    cfg = dict(max_turn_tokens=8, threads_per_worker=1)
    local = RolloutPool(spec, RolloutConfig(num_workers=0, **cfg))
    remote = RolloutPool(spec, RolloutConfig(num_workers=1, cpus_per_worker=1, **cfg), RayConfig(num_cpus=2))
    two = RolloutPool(spec, RolloutConfig(num_workers=2, cpus_per_worker=0.5, **cfg), RayConfig(num_cpus=2))
    try:
        import os

        import ray

        # rollout actors run at normal priority (Ray's default for workers is nice 15)
        assert os.getpriority(os.PRIO_PROCESS, ray.get(remote.actors[0].ping.remote())) == 0
        a = _episodes(local, seed=7)
        assert _episodes(remote, seed=7) == a
        assert _episodes(local, seed=8) != a
        # two workers split the batch by whole task groups and keep global group ids
        split = _episodes(two, seed=7)
        assert [g for g, _, _ in split] == [g for g, _, _ in a] == [0, 0, 1, 1, 2, 2]
    finally:
        for pool in (local, remote, two):
            pool.shutdown()
