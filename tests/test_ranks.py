"""Several learner ranks (algos/ranks.py): 2 ranks over gloo compute the update 1 rank computes,
under ZeRO 0, 2 and 3, and a 2-rank RL run killed midway resumes to the uninterrupted run's weights."""
from __future__ import annotations

import os
import signal
import sys

import pytest
import torch
from rl_helpers import rl_experiment, tiny_policy, tiny_tokenizer
from test_learner import synthetic_episodes

from algos.config import ConfigError, load_config
from algos.learner import Learner

pytest.importorskip("ray")


@pytest.fixture(scope="module", autouse=True)
def _ray():
    import ray

    from rollout.worker import RayConfig, init_ray

    init_ray(RayConfig(num_cpus=2))
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the ranks build SGD from here
    yield
    ray.shutdown()


def _policy_folder(tmp_path):
    tok = tiny_tokenizer()
    folder = tmp_path / "policy"
    tiny_policy(tok, seed=0).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


class SGD(torch.optim.SGD):
    """Plain SGD with AdamW's keywords: unlike Adam its step scales with the gradient, so a rank
    that summed its gradients wrongly (half, or twice, the mini-batch's) shows in the weights."""

    def __init__(self, params, lr, betas=None, weight_decay=0.0):
        super().__init__(params, lr=lr, weight_decay=weight_decay)


def _experiment(tmp_path, ranks: int, zero_stage: int, **rl):
    exp = rl_experiment(tmp_path / f"ranks{ranks}", **rl)
    exp.runtime.zero_stage = zero_stage
    exp.learner.num_ranks = ranks
    return exp


@pytest.mark.parametrize("algo,zero_stage,epochs,kl", [("ppo", 0, 2, 0.0), ("grpo", 2, 1, 0.1), ("ppo", 3, 1, 0.0)])
def test_two_ranks_update_the_policy_as_one_rank_does(tmp_path, algo, zero_stage, epochs, kl):
    from algos.ranks import LearnerGroup

    folder = _policy_folder(tmp_path)
    # 11 episodes in mini-batches of 8 and 3: the 3 split 2 + 1, so one rank pads its share
    rl = dict(algo=algo, epochs=epochs, kl_coef=kl, minibatch_size=8, micro_batch_size=2, lr=0.5, grad_clip=0.0,
              critic_grad_clip=0.0)
    trajs = synthetic_episodes(11, seed=4, groups=3)
    tok = tiny_tokenizer()
    one = Learner(_experiment(tmp_path, 1, zero_stage, **rl), tiny_policy(tok, seed=0), tok.pad_token_id,
                  optimizer_cls=SGD)
    start = {k: v.clone() for k, v in one.policy_state_dict().items()}
    m1 = one.update(trajs, seed=3)
    p1 = one.policy_state_dict()

    group = LearnerGroup(_experiment(tmp_path, 2, zero_stage, **rl), folder, optimizer_cls=SGD)
    try:
        m2 = group.update(trajs, seed=3)
        ranks = group.parameters()
    finally:
        group.shutdown()
    assert m2["old_pass"] == m1["old_pass"] and m2["episodes"] == 11
    for key in ("policy_loss", "entropy", "clip_frac") + (("value_loss",) if algo == "ppo" else ("kl_ref",)):
        assert m2[key] == pytest.approx(m1[key], rel=1e-4, abs=1e-6), key
    moved = max((p1[k] - start[k]).abs().max().item() for k in p1)
    assert moved > 1e-4  # the update did change the weights ...
    for p2 in ranks:  # ... and both ranks hold what one rank computed
        assert p2.keys() == p1.keys()
        worst = max((p2[k] - p1[k]).abs().max().item() for k in p1)
        assert worst < 1e-5 + 1e-4 * moved, f"ZeRO {zero_stage}: ranks differ from one rank by {worst} (moved {moved})"


def test_a_rank_lost_mid_run_fails_the_iteration_and_the_run_resumes_to_the_uninterrupted_weights(
        tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from algos.checkpoint import latest_checkpoint
    from algos.ranks import LearnerGroup, LearnerRankError
    from algos.rl import train_rl

    folder = _policy_folder(tmp_path)
    rl = dict(iterations=3, save_every=1, minibatch_size=16, micro_batch_size=8, tasks_per_iter=2, group_size=4)
    full = _experiment(tmp_path / "full", 2, 2, **rl)  # ZeRO-2: each rank holds half the optimizer state
    cut = _experiment(tmp_path / "cut", 2, 2, **rl)
    full.reward.density = cut.reward.density = "dense"  # a reward on most episodes: the policy moves
    train_rl(full, folder)

    real_update, updates = LearnerGroup.update, []

    def rank_1_dies_in_the_third_update(group, trajs, seed=0):
        updates.append(seed)
        if len(updates) == 3:
            os.kill(group.pids()[1], signal.SIGKILL)
        return real_update(group, trajs, seed)

    monkeypatch.setattr(LearnerGroup, "update", rank_1_dies_in_the_third_update)
    with pytest.raises(LearnerRankError, match="learner rank 1 failed to update.*--resume"):
        train_rl(cut, folder)
    assert latest_checkpoint(cut.out_dir).name == "step_0000002"
    monkeypatch.setattr(LearnerGroup, "update", real_update)
    train_rl(cut, folder, resume=True)
    a = load_file(latest_checkpoint(full.out_dir) / "model" / "model.safetensors")
    b = load_file(latest_checkpoint(cut.out_dir) / "model" / "model.safetensors")
    start = load_file(folder / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], start[k]) for k in a)
    # every rank wrote its partition of the optimizer state into the one checkpoint (and read it back)
    shards = sorted(p.name for p in (latest_checkpoint(cut.out_dir) / "learner" / "state").glob("*optim_states.pt"))
    assert len(shards) == 2 and "rank_0" in shards[0] and "rank_1" in shards[1]


def test_more_ranks_than_a_mini_batch_holds_is_a_named_error(tiny_recipe):
    with pytest.raises(ConfigError, match=r"learner.num_ranks=9 exceeds rl.minibatch_size=8"):
        load_config(tiny_recipe, ["+learner.num_ranks=9", "+rl.minibatch_size=8", "+rl.micro_batch_size=8"])


def test_a_local_reservation_beyond_this_machine_fails_at_once(tmp_path):
    import time

    from rollout.runner import RolloutConfig
    from rollout.worker import RayConfig, RolloutPool, WorkerSpec

    spec = WorkerSpec(policy_folder=str(_policy_folder(tmp_path)), env_name="countdown_search", env_options={})
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"could not place 3 rollout workers.*needs \{'CPU': 3.0\} in all \(free on"):
        RolloutPool(spec, RolloutConfig(num_workers=3, cpus_per_worker=1), RayConfig(placement_timeout_s=300))
    assert time.perf_counter() - t0 < 60  # not the 300 s timeout
