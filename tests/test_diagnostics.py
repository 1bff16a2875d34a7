"""What the learner logs for an RL engineer to read (issue 18): the share of groups with no reward
spread, the critic's explained variance, the credit per turn, and the gradient norms."""
from __future__ import annotations

import pytest
import torch
from rl_helpers import rl_experiment, tiny_policy, tiny_tokenizer
from test_learner import synthetic_episodes

from algos.advantages import advantage_by_turn, explained_variance, turn_index, zero_variance_share
from algos.learner import Learner


def test_zero_variance_share_counts_groups_whose_returns_are_all_equal():
    returns = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5, 2.0])
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 3])  # group 3 has one episode: not a group baseline
    assert zero_variance_share(returns, groups) == pytest.approx(2 / 3)


def test_explained_variance_is_one_for_a_perfect_critic_and_zero_for_the_mean():
    mask = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 1]])
    returns = torch.tensor([[1.0, 2.0, 9.0, 3.0], [9.0, 4.0, 5.0, 6.0]])
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    mean = returns[mask.bool()].mean()
    assert explained_variance(torch.full_like(returns, float(mean)), returns, mask) == pytest.approx(0.0, abs=1e-9)
    assert explained_variance(-returns, returns, mask) < 0


def test_turns_are_runs_of_policy_tokens_and_credit_is_averaged_per_turn():
    mask = torch.tensor([[0, 1, 1, 0, 0, 1, 0, 1, 1], [0, 0, 1, 0, 1, 1, 0, 0, 0]])
    assert turn_index(mask).tolist() == [[0, 1, 1, 0, 0, 2, 0, 3, 3], [0, 0, 1, 0, 2, 2, 0, 0, 0]]
    adv = torch.arange(18, dtype=torch.float).view(2, 9)
    stats = advantage_by_turn(adv, mask, turns=2)
    assert stats["adv_turn1"] == pytest.approx((1 + 2 + 11) / 3)
    assert stats["adv_turn2"] == pytest.approx((5 + 13 + 14) / 3)
    assert stats["adv_turn_last"] == pytest.approx((7 + 8 + 13 + 14) / 4)  # each episode's own last turn


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_the_update_logs_the_diagnostics(tmp_path, algo):
    tok = tiny_tokenizer()
    learner = Learner(rl_experiment(tmp_path, algo=algo, minibatch_size=8, micro_batch_size=4),
                      tiny_policy(tok), tok.pad_token_id)
    m = learner.update(synthetic_episodes(16, seed=1, groups=4), seed=0)
    assert 0.0 <= m["zero_var_groups"] <= 1.0 and m["grad_norm"] > 0
    assert {"adv_turn1", "adv_turn2", "adv_turn_last"} <= set(m)
    if algo == "ppo":  # a zero-initialised value head: V = 0, so the variance explained is ≤ 0
        assert m["critic_grad_norm"] > 0 and m["explained_variance"] <= 1e-6
    else:
        assert "explained_variance" not in m and "critic_grad_norm" not in m


def test_gradient_norms_agree_across_zero_stages(tmp_path):
    """ZeRO 0 reads the norm off the gradients; ZeRO 2 and 3 from DeepSpeed's partitioned optimizer."""
    tok = tiny_tokenizer()
    norms = []
    for stage in (0, 2, 3):
        exp = rl_experiment(tmp_path / str(stage), algo="ppo", minibatch_size=8, micro_batch_size=4)
        exp.runtime.zero_stage = stage
        m = Learner(exp, tiny_policy(tok), tok.pad_token_id).update(synthetic_episodes(16, seed=1, groups=4))
        norms.append((m["grad_norm"], m["critic_grad_norm"]))
    for other in norms[1:]:
        assert other == pytest.approx(norms[0], rel=1e-4)


def _episode(group: int, ret: float):
    from rollout.trajectory import Trajectory

    t = Trajectory(task={"id": f"t{group}"}, group=group)
    t.append([5, 6], policy=True, logprobs=[-1.0, -1.0])
    t.add_turn_reward(ret)
    return t


def test_dynamic_sampling_keeps_groups_with_spread_and_refills_with_fresh_group_ids():
    from algos.rl import informative_groups

    first = [_episode(0, 1.0), _episode(0, 1.0), _episode(1, 0.0), _episode(1, 1.0)]  # group 0 all won: no signal
    calls = []

    def play_more(round_):
        calls.append(round_)
        return [_episode(0, 0.0), _episode(0, 1.0), _episode(1, 0.0), _episode(1, 0.0)]  # its group 0 has spread

    kept, rounds = informative_groups(first, want=2, max_refills=3, play_more=play_more)
    assert rounds == 1 and calls == [1]
    groups = {}
    for t in kept:
        groups.setdefault(t.group, []).append(t.episode_return)
    assert len(groups) == 2 and all(len(set(r)) > 1 for r in groups.values())
    assert 1 in groups and min(g for g in groups if g != 1) >= 2  # the refill's groups were renumbered past 1
    # enough groups already: no refill; none to be had: stops after max_refills
    assert informative_groups(first, want=1, max_refills=3, play_more=play_more)[1] == 0
    assert informative_groups(first[:2], want=1, max_refills=2, play_more=lambda r: first[:2])[1] == 2


def test_the_loop_trains_only_on_informative_groups_under_dynamic_sampling(tmp_path, monkeypatch):
    import json

    from algos.rl import train_rl

    seen, real = [], Learner.update

    def recording(self, trajs, seed=0):
        by = {}
        for t in trajs:
            by.setdefault(t.group, set()).add(t.episode_return)
        seen.append(by)
        return real(self, trajs, seed)

    monkeypatch.setattr(Learner, "update", recording)
    tok = tiny_tokenizer()
    folder = tmp_path / "policy"
    tiny_policy(tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    exp = rl_experiment(tmp_path, iterations=2, save_every=2, dynamic_sampling=True, max_refills=2)
    train_rl(exp, folder)
    assert seen and all(len(r) > 1 for by in seen for r in by.values())
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/refills" in r]
    assert len(train) == 2 and all(r["train/groups_kept"] <= 4 for r in train)
