"""The RL core: advantage math by hand, token bookkeeping of trajectories, learning on a toy task,
infra errors, Ray round trip and exact resume."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from rl_helpers import GOOD, rl_experiment, tiny_policy, tiny_tokenizer

import envs
from algos.advantages import compute_advantages, gae, group_baselines, returns_to_go
from algos.learner import Batch, Learner
from envs import format_for
from rollout.engine import Completion, TorchEngine
from rollout.runner import EpisodeRunner, RolloutConfig

# -- advantages against hand-computed values ---------------------------------------------------


def test_gae_matches_hand_computation():
    r, v = torch.tensor([0.0, 0.0, 1.0]), torch.tensor([0.5, 0.6, 0.8])
    g, lam = 0.9, 0.8
    d2 = 1.0 - 0.8  # last token: no next value
    d1 = 0.0 + g * 0.8 - 0.6
    d0 = 0.0 + g * 0.6 - 0.5
    a2 = d2
    a1 = d1 + g * lam * a2
    a0 = d0 + g * lam * a1
    adv, ret = gae(r, v, g, lam)
    assert torch.allclose(adv, torch.tensor([a0, a1, a2]))
    assert torch.allclose(ret, adv + v)
    # λ = 1, γ = 1: advantages are Monte-Carlo returns minus values
    adv, _ = gae(r, v, 1.0, 1.0)
    assert torch.allclose(adv, torch.tensor([1.0, 1.0, 1.0]) - v)


def test_group_baselines_grpo_and_rloo_by_hand():
    returns = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5])
    groups = torch.tensor([0, 0, 0, 0, 1, 1])
    b, s = group_baselines(returns, groups, "grpo", std_normalize=True)
    assert torch.allclose(b, torch.tensor([0.5, 0.5, 0.5, 0.5, 0.5, 0.5]))
    assert torch.allclose(s[:4], torch.full((4,), 0.5 + 1e-6))  # population std of {1,0,0,1}
    assert torch.allclose((returns - b) / s, torch.tensor([1.0, -1.0, -1.0, 1.0, 0.0, 0.0]), atol=1e-5)
    assert torch.equal(s[4:], torch.ones(2))  # equal returns: nothing to normalise by
    b, s = group_baselines(returns, groups, "grpo", std_normalize=False)
    assert torch.equal(s, torch.ones(6))
    b, s = group_baselines(returns, groups, "rloo")
    # leave-one-out: member 0 sees the mean of (0, 0, 1) = 1/3
    assert torch.allclose(b, torch.tensor([1 / 3, 2 / 3, 2 / 3, 1 / 3, 0.5, 0.5]))
    assert torch.allclose(returns - b, torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0.0, 0.0]))


def test_loss_weights_token_and_episode_by_hand():
    from algos.losses import loss_weights, weighted_sum

    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    x = torch.tensor([[1.0, 2.0, 3.0, 99.0], [99.0, 10.0, 99.0, 99.0]])
    token, episode = loss_weights(mask, "token"), loss_weights(mask, "episode")
    assert torch.allclose(token, mask / 4) and float(weighted_sum(x, token)) == pytest.approx(16 / 4)
    assert torch.allclose(episode, torch.tensor([[1 / 6, 1 / 6, 1 / 6, 0], [0, 1 / 2, 0, 0]]))
    assert float(weighted_sum(x, episode)) == pytest.approx((2.0 + 10.0) / 2)  # mean of episode means
    # the weights of a mini-batch split into micro-batches: the parts' sums add up to the whole's
    assert float(weighted_sum(x[:1], episode[:1]) + weighted_sum(x[1:], episode[1:])) == pytest.approx(6.0)


def test_group_credit_to_go_and_episode_by_hand():
    """Dense rewards, one RLOO group of two 2-turn episodes: returns (0.5+0.5) and (0.5+0).
    to_go credits each turn with the reward from it on; episode gives every token R − baseline."""
    from rollout.trajectory import Trajectory

    tok = tiny_tokenizer()
    trajs = []
    for second in (0.5, 0.0):
        tr = Trajectory(task={"id": "t"}, group=0)
        tr.append([1, 5], policy=False)
        tr.append([7, 8], policy=True, logprobs=[-1.0, -1.0])
        tr.add_turn_reward(0.5)
        tr.append([5], policy=False)
        tr.append([9], policy=True, logprobs=[-1.0])
        tr.add_turn_reward(second)
        trajs.append(tr)
    batch = Batch.from_trajectories(trajs, tok.pad_token_id)
    # to_go: member 0's G = (1.0, 1.0, 0.5) against the other's R = 0.5, member 1's (0.5, 0.5, 0) against 1.0
    for credit, want in [("to_go", [0.5, 0.5, 0.0, -0.5, -0.5, -1.0]),
                         ("episode", [0.5, 0.5, 0.5, -0.5, -0.5, -0.5])]:
        cfg = rl_experiment(Path("unused"), algo="rloo", group_credit=credit).rl
        adv, _ = compute_advantages("rloo", batch.rewards, batch.mask, None, batch.groups, cfg)
        got = adv[batch.mask.bool()].tolist()
        assert got == pytest.approx(want), credit


def test_returns_to_go():
    assert torch.allclose(returns_to_go(torch.tensor([0.25, 0.0, 0.5]), 0.5), torch.tensor([0.375, 0.25, 0.5]))


# -- trajectories: masks, observation ids, reward placement ------------------------------------


class ScriptedEngine:
    """Answers every turn with fixed token ids (so the test knows what the policy 'wrote')."""

    def __init__(self, ids):
        self.ids = ids
        self.prompts = []

    def generate(self, prompts, params, sessions=None):
        self.prompts.append([list(p) for p in prompts])
        return [Completion(list(self.ids), [-0.5] * len(self.ids), "stop") for _ in prompts]

    def release(self, sessions):
        pass


def _runner(engine, density="dense", **env_cfg):
    tok = tiny_tokenizer()
    cfg = envs.validate_config("toy_two_turn", {"reward_density": density, **env_cfg})
    rc = RolloutConfig(num_workers=0, max_turn_tokens=3, env_timeout_s=0.5)
    return EpisodeRunner(engine, tok, lambda: envs.make("toy_two_turn", cfg), format_for("toy_two_turn"), rc, 256)


@pytest.mark.parametrize("density", ["dense", "sparse"])
def test_trajectory_masks_observation_ids_and_reward_placement(density):
    tok = tiny_tokenizer()
    nl = tok.encode("\n", add_special_tokens=False)
    line = tok.encode("A", add_special_tokens=False) + nl  # good on turn 1, bad on turn 2 (not lowercase)
    engine = ScriptedEngine(line)
    trajs, stats = _runner(engine, density).play([{"id": "t"}], group_size=2, seed=0)
    assert len(trajs) == 2 and stats.turns == 4
    tr = trajs[0]
    obs0 = [tok.bos_token_id] + tok.encode("turn 1: say a letter\n", add_special_tokens=False)
    obs1 = tok.encode("turn 2: another letter\n", add_special_tokens=False)
    # the conversation is built from ids: obs0, action, obs1, action — observations are not policy tokens
    assert tr.token_ids == obs0 + line + obs1 + line
    assert tr.policy_mask == [0] * len(obs0) + [1] * len(line) + [0] * len(obs1) + [1] * len(line)
    assert tr.logprobs == [0.0] * len(obs0) + [-0.5] * len(line) + [0.0] * len(obs1) + [-0.5] * len(line)
    # the second turn's prompt is the whole conversation so far, ids appended (never re-tokenised)
    assert engine.prompts[1][0] == obs0 + line + obs1
    ends = [len(obs0) + len(line) - 1, len(tr.token_ids) - 1]
    assert tr.turn_ends == ends
    want = {ends[0]: 0.5} if density == "dense" else {}  # dense pays the good first turn; sparse: no win, 0
    assert {i: r for i, r in enumerate(tr.rewards) if r} == want
    assert tr.turns == 2 and not tr.won and tr.infra_error is None
    # the learner's batch: shifted by one, the mask selects exactly the policy's tokens
    batch = Batch.from_trajectories(trajs, tok.pad_token_id)
    assert batch.mask[0].tolist() == tr.policy_mask[1:]
    assert batch.rewards[0].sum().item() == sum(tr.rewards)


def test_env_that_raises_or_hangs_is_an_infra_error_and_the_rest_go_on():
    tok = tiny_tokenizer()
    line = tok.encode("s", add_special_tokens=False) + tok.encode("\n", add_special_tokens=False)
    for fail in ("step", "hang"):
        trajs, _ = _runner(ScriptedEngine(line), fail_on=fail, hang_s=2.0).play([{"id": "t"}], group_size=2)
        assert all(t.infra_error for t in trajs), fail
        assert ("timeout" in trajs[0].infra_error) == (fail == "hang")
    # a healthy runner afterwards plays normally
    trajs, _ = _runner(ScriptedEngine(line)).play([{"id": "t"}], group_size=1)
    assert trajs[0].infra_error is None and trajs[0].turns == 2


def test_infra_error_episodes_are_counted_not_scored_nor_learned_from(tmp_path):
    from algos.evaluate import summarize

    tok = tiny_tokenizer()
    line = tok.encode("s", add_special_tokens=False) + tok.encode("\n", add_special_tokens=False)
    trajs, stats = _runner(ScriptedEngine(line), fail_on="step").play([{"id": "t"}], group_size=3)
    m = summarize(trajs, stats.as_dict())
    assert m["infra_errors"] == 3 and m["mean_return"] == 0.0 and m["tasks"] == 0
    # the learner itself drops them: a batch of only infra errors is no update
    # (tests/test_learner.py checks that a mixed batch updates exactly as its healthy episodes)
    learner = Learner(rl_experiment(tmp_path), tiny_policy(tok), tok.pad_token_id)
    assert learner.update(trajs) == {}


# -- learning: each algorithm raises the toy task's reward --------------------------------------


@pytest.mark.parametrize("algo,density,aggregation", [("grpo", "sparse", "token"), ("rloo", "sparse", "token"),
                                                       ("ppo", "dense", "token"), ("grpo", "dense", "episode")])
def test_each_algorithm_raises_mean_reward(tmp_path, algo, density, aggregation):
    tok = tiny_tokenizer()
    policy = tiny_policy(tok)
    exp = rl_experiment(tmp_path, algo=algo, group_size=8, lr=1e-2, loss_aggregation=aggregation)
    exp.reward.density = density
    learner = Learner(exp, policy, tok.pad_token_id)
    engine = TorchEngine(tiny_policy(tok), tok.pad_token_id)
    engine.update_weights(learner.policy_state_dict())
    runner = _runner(engine, density)
    tasks = [{"id": f"t{i}"} for i in range(8)]
    rewards = []
    for it in range(14):
        trajs, _ = runner.play(tasks, group_size=8, seed=it)
        rewards.append(sum(t.episode_return for t in trajs) / len(trajs))
        learner.update(trajs, seed=it)
        engine.update_weights(learner.policy_state_dict())
    start, end = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert end > start + 0.3, (algo, rewards)


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_on_policy_update_without_the_old_pass_equals_the_update_with_it(tmp_path, algo):
    # One epoch, one mini-batch: the learner skips the no-grad π_old pass (π_old = the gradient
    # pass, detached). The update must be the same as with the pass, KL and TIS terms included.
    tok = tiny_tokenizer()
    engine = TorchEngine(tiny_policy(tok), tok.pad_token_id)
    trajs, _ = _runner(engine, "dense").play([{"id": f"t{i}"} for i in range(4)], group_size=4, seed=3)
    updated = []
    for fast in (True, False):
        exp = rl_experiment(tmp_path, algo=algo, epochs=1, minibatch_size=16, micro_batch_size=8,
                            kl_coef=0.1, tis_cap=2.0, lr=1e-2)
        learner = Learner(exp, tiny_policy(tok), tok.pad_token_id)
        learner.fast_on_policy = fast
        assert learner.on_policy(len(trajs)) == fast
        metrics = learner.update(trajs, seed=0)
        assert metrics["old_pass"] == (0.0 if fast else 1.0)
        updated.append((learner.policy_state_dict(), metrics))
    (fast_w, fast_m), (slow_w, slow_m) = updated
    assert any((fast_w[k] != tiny_policy(tok).state_dict()[k]).any() for k in fast_w)  # it did move
    for k in fast_w:
        torch.testing.assert_close(fast_w[k], slow_w[k], rtol=1e-5, atol=1e-6, msg=k)
    for k in ("policy_loss", "kl_ref", "tis_weight", "logp_gap"):
        assert fast_m[k] == pytest.approx(slow_m[k], rel=1e-4, abs=1e-6), k


def test_good_letters_are_rare_for_a_random_policy():
    # the learning test above is meaningful only if the start policy rarely succeeds
    tok = tiny_tokenizer()
    engine = TorchEngine(tiny_policy(tok), tok.pad_token_id)
    trajs, _ = _runner(engine, "sparse").play([{"id": "t"}], group_size=64, seed=1)
    assert sum(t.won for t in trajs) / 64 < 0.15
    assert "A" in GOOD[0] and "A" not in GOOD[1]


# -- Ray workers and the training loop ----------------------------------------------------------


def _policy_folder(tmp_path, seed=0):
    tok = tiny_tokenizer()
    folder = tmp_path / f"policy{seed}"
    tiny_policy(tok, seed=seed).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_ray_worker_round_trip_matches_in_process_play(tmp_path):
    pytest.importorskip("ray")
    from rollout.worker import RayConfig, RolloutPool, WorkerSpec

    spec = WorkerSpec(policy_folder=str(_policy_folder(tmp_path)), env_name="countdown_search",
                      env_options={"num_inputs": 3, "max_number": 20, "max_turns": 3}, max_episode_tokens=256)
    tasks = [{"numbers": [3, 4, 5], "target": 27}, {"numbers": [2, 9, 9], "target": 11}]
    cfg = dict(max_turn_tokens=8, threads_per_worker=1)
    local = RolloutPool(spec, RolloutConfig(num_workers=0, **cfg))
    remote = RolloutPool(spec, RolloutConfig(num_workers=1, cpus_per_worker=1, **cfg), RayConfig(num_cpus=2))
    try:
        def play(pool):
            trajs, stats = pool.play(tasks, group_size=2, seed=5, temperature=0.0)
            return [(t.group, t.token_ids, t.policy_mask, t.turns) for t in trajs], stats

        a, _ = play(local)
        b, stats = play(remote)
        assert a == b and len(a) == 4 and stats["turns"] == sum(x[3] for x in a)
        # new weights reach the actor: both sides now play the other policy, identically
        # (scaled up: two near-zero random inits both greedily write an empty line)
        new = {k: v if "norm" in k else 20 * v for k, v in tiny_policy(tiny_tokenizer(), seed=1).state_dict().items()}
        assert remote.update_weights(new) > 0
        local.update_weights(new)
        a2, _ = play(local)
        b2, _ = play(remote)
        assert a2 == b2 and a2 != a
        # a worker process that dies (e.g. an env's native code segfaults) is replaced, gets the
        # current weights and replays its share: the result is what the live worker would return
        import ray

        os.kill(ray.get(remote.actors[0].ping.remote()), signal.SIGKILL)
        with pytest.warns(RuntimeWarning, match="rollout worker 0 died"):
            b3, _ = play(remote)
        assert b3 == a2 and remote.restarts == 1
    finally:
        local.shutdown()
        remote.shutdown()


def test_rl_loop_resume_equals_uninterrupted_run(tmp_path):
    from safetensors.torch import load_file

    from algos.checkpoint import latest_checkpoint
    from algos.rl import train_rl

    folder = _policy_folder(tmp_path)
    full = rl_experiment(tmp_path / "full", iterations=4, save_every=2)
    out = train_rl(full, folder)
    assert set(out) == {"before", "after"}

    cut = rl_experiment(tmp_path / "cut", iterations=4, save_every=2)
    assert train_rl(cut, folder, stop_after=2)["stopped_at"] == 2  # "killed" after iteration 2
    assert latest_checkpoint(cut.out_dir).name == "step_0000002"
    train_rl(cut, folder, resume=True)

    a = load_file(latest_checkpoint(full.out_dir) / "model" / "model.safetensors")
    b = load_file(latest_checkpoint(cut.out_dir) / "model" / "model.safetensors")
    start = load_file(folder / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], start[k]) for k in a)  # and training did change the policy
    # metrics were logged for every iteration of both halves
    import json

    rows = [json.loads(x) for x in (tmp_path / "cut" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in rows if "train/mean_return" in r) == [1, 2, 3, 4]


def test_rl_tasks_can_skip_the_games_sft_imitated(tmp_path, monkeypatch):
    import random

    from algos.rl import train_rl
    from envs.base import TaskSource

    source = envs.make_tasks("toy_two_turn")  # 4 train tasks
    train = source.tasks("train")
    drawn = source.sample_tasks("train", 200, random.Random(0), skip=3)
    assert {t["id"] for t in drawn} == {train[3]["id"]}
    assert len({t["id"] for t in source.sample_tasks("train", 200, random.Random(0))}) == 4
    with pytest.raises(ValueError, match="past its first 4"):
        source.sample_tasks("train", 1, random.Random(0), skip=4)
    # the loop draws past sft.demos.num_examples when rl.skip_sft_tasks is on
    drawn_ids = []
    original = TaskSource.sample_tasks

    def spy(self, split, n, rng, skip=0):
        tasks = original(self, split, n, rng, skip)
        drawn_ids.extend(t["id"] for t in tasks)
        return tasks

    monkeypatch.setattr(TaskSource, "sample_tasks", spy)
    exp = rl_experiment(tmp_path, skip_sft_tasks=True, iterations=2, tasks_per_iter=8, group_size=2,
                        save_every=2)
    exp.sft.demos.num_examples = 2
    train_rl(exp, _policy_folder(tmp_path))
    assert len(drawn_ids) == 16 and set(drawn_ids) <= {train[2]["id"], train[3]["id"]}


def test_held_out_evals_can_add_sampled_success(tmp_path, capsys):
    """rl.eval_samples plays that many more episodes per held-out task at rollout.temperature; at
    temperature 0 they replay the greedy episode, so their success must equal greedy success."""
    from algos.rl import evaluate_pool, train_rl
    from rollout.worker import RolloutPool, WorkerSpec

    folder = _policy_folder(tmp_path)
    exp = rl_experiment(tmp_path, iterations=1, save_every=1, eval_samples=3)
    out = train_rl(exp, folder)
    for when in ("before", "after"):  # what each sampled eval measures is checked below, at temperature 0
        assert isinstance(out[when].get("sampled_accuracy"), float), when
    assert "sampled" in capsys.readouterr().out
    spec = WorkerSpec(policy_folder=str(folder), env_name="toy_two_turn", env_options={}, max_episode_tokens=256)
    pool = RolloutPool(spec, exp.rollout)
    try:
        tasks = envs.make_tasks("toy_two_turn").tasks("heldout")
        summary, _ = evaluate_pool(pool, tasks, seed=0, samples=3, temperature=0.0)
        assert summary["sampled_accuracy"] == summary["accuracy"]
    finally:
        pool.shutdown()
    exp = rl_experiment(tmp_path / "greedy_only", iterations=1, save_every=1)
    assert "sampled_accuracy" not in train_rl(exp, folder)["after"]


def test_periodic_evals_read_the_valid_split_and_the_end_the_test_split(tmp_path, monkeypatch):
    import algos.rl
    from algos.rl import train_rl

    played = []
    real = algos.rl.evaluate_pool

    def spy(pool, tasks, *args, **kwargs):
        played.append({t["id"][:-1] for t in tasks})
        return real(pool, tasks, *args, **kwargs)

    monkeypatch.setattr(algos.rl, "evaluate_pool", spy)
    train_rl(rl_experiment(tmp_path, iterations=3, eval_every=1, save_every=3), _policy_folder(tmp_path))
    assert played == [{"heldout"}, {"valid"}, {"valid"}, {"heldout"}]  # before, iterations 1 and 2, after
