"""The learner's update, checked against what it must not depend on: the micro-batch size (5d),
the critic's gradient (5e), infra-error episodes (5h), the sampling temperature (5a), dropout in
the critic (5b); and PPO's advantages through the learner with observation tokens between turns."""
from __future__ import annotations

import os
import random

import pytest
import torch
from rl_helpers import rl_experiment, tiny_policy, tiny_tokenizer

from algos.learner import Batch, Learner, build_critic
from rollout.trajectory import Trajectory


def synthetic_episodes(n: int, seed: int = 0, groups: int = 3, infra_errors: int = 0) -> list[Trajectory]:
    """n two-turn episodes of random tokens and lengths: obs, action, obs, action (dense rewards)."""
    tok = tiny_tokenizer()
    rng = random.Random(seed)
    vocab = len(tok)
    trajs = []
    for i in range(n):
        tr = Trajectory(task={"id": f"t{i % groups}"}, group=i % groups)
        tr.append([tok.bos_token_id] + [rng.randrange(4, vocab) for _ in range(rng.randint(1, 3))], policy=False)
        for turn in range(2):
            k = rng.randint(1, 6)
            tr.append([rng.randrange(4, vocab) for _ in range(k)], policy=True,
                      logprobs=[rng.uniform(-7.0, -4.0) for _ in range(k)])
            tr.add_turn_reward(rng.choice([0.0, 0.5]))
            if turn == 0:
                tr.append([rng.randrange(4, vocab) for _ in range(rng.randint(1, 3))], policy=False)
        tr.turns = 2
        if i < infra_errors:
            tr.infra_error = "the env broke"
        trajs.append(tr)
    return trajs


def _learner(tmp_path, **rl) -> Learner:
    tok = tiny_tokenizer()
    return Learner(rl_experiment(tmp_path, **rl), tiny_policy(tok), tok.pad_token_id)


def _critic_state(learner):
    return {k: v.detach().float().clone() for k, v in learner.critic_engine.module.state_dict().items()}


# -- 5d: the objective does not depend on micro_batch_size ---------------------------------------


def sgd(params, lr, betas, weight_decay):
    """Plain SGD: a step is lr × the gradient, so equal steps mean equal objectives (Adam's first
    step, lr·g/(|g| + ε), would turn round-off in near-zero gradients into whole steps)."""
    return torch.optim.SGD(params, lr=lr)


@pytest.mark.parametrize("algo,aggregation", [("grpo", "token"), ("grpo", "episode"), ("ppo", "token"),
                                              ("ppo", "episode")])
def test_update_does_not_depend_on_micro_batch_size(tmp_path, algo, aggregation):
    # 10 episodes in mini-batches of 8: the last one is short (2). Micro-batches of 8 split them
    # 8 + 2, of 3 split 3+3+2 + 2 (uneven), of 2 split 2+2+2+2 + 2. Two epochs: the second reads π_old.
    trajs = synthetic_episodes(10)
    after = []
    for micro in (8, 3, 2):
        tok = tiny_tokenizer()
        exp = rl_experiment(tmp_path, algo=algo, loss_aggregation=aggregation, minibatch_size=8,
                            micro_batch_size=micro, epochs=2, lr=1.0, kl_coef=0.05, entropy_coef=0.01)
        learner = Learner(exp, tiny_policy(tok), tok.pad_token_id, optimizer_cls=sgd)
        critic_start = _critic_state(learner) if algo == "ppo" else {}
        metrics = learner.update(trajs, seed=0)
        critic_step = {k: v - critic_start[k] for k, v in _critic_state(learner).items()} if algo == "ppo" else {}
        after.append((learner.policy_state_dict(), metrics, critic_step))
    (a, ma, ca), others = after[0], after[1:]
    start = tiny_policy(tiny_tokenizer()).state_dict()
    assert any(not torch.allclose(a[k], start[k]) for k in a)  # the update moved the policy
    assert algo != "ppo" or any(v.abs().max() > 0 for v in ca.values())  # ... and the critic
    for b, mb, cb in others:
        for k in a:
            torch.testing.assert_close(b[k] - start[k], a[k] - start[k], rtol=1e-4, atol=1e-6, msg=k)
        for k in ca:  # the critic's step does not depend on the micro-batch size either
            torch.testing.assert_close(cb[k], ca[k], rtol=1e-4, atol=1e-6, msg=f"critic {k}")
        # the logged numbers are weighted the same way: they do not depend on the micro-batch size either
        for k in ("policy_loss", "entropy", "kl_ref", "clip_frac") + (("value_loss",) if algo == "ppo" else ()):
            assert mb[k] == pytest.approx(ma[k], rel=1e-4, abs=1e-6), k


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_micro_batches_hold_episodes_of_similar_length(tmp_path, algo):
    """Each pass (PPO's no-grad scoring and every optimizer step) feeds its micro-batches in order
    of episode length, so a micro-batch is padded only to its own longest episode; the test above
    shows the update is the same as unsorted."""
    trajs = synthetic_episodes(12, seed=3)
    learner = _learner(tmp_path, algo=algo, minibatch_size=6, micro_batch_size=2, epochs=2)
    fed, rows_of = [], learner._rows

    def spy(batch, rows):
        fed.append(batch.attention_mask[rows].sum(-1).tolist())
        return rows_of(batch, rows)

    learner._rows = spy
    learner.update(trajs, seed=0)
    # scoring π_old (epochs > 1): 12 episodes in 6 micro-batches; then 2 epochs × 2 mini-batches of 3
    passes = [fed[:6]] + [fed[6 + 3 * p: 9 + 3 * p] for p in range(4)]
    assert len(fed) == 6 + 4 * 3
    assert len({len(t.token_ids) for t in trajs}) > 3  # the lengths differ: the order is a real constraint
    for micros in passes:
        flat = [n for micro in micros for n in micro]
        assert flat == sorted(flat), flat


# -- 5e: the critic has its own optimiser, learning rate and gradient clip ---------------------


def test_a_huge_value_gradient_does_not_shrink_the_policy_step(tmp_path):
    trajs = synthetic_episodes(8)
    steps = []
    for vf_coef in (0.5, 1e8):
        learner = _learner(tmp_path, algo="ppo", vf_coef=vf_coef, minibatch_size=8, micro_batch_size=8, lr=1e-3,
                           grad_clip=1.0)
        learner.update(trajs, seed=0)
        steps.append(learner.policy_state_dict())
    start = tiny_policy(tiny_tokenizer()).state_dict()
    moved = [sum(float((s[k] - start[k]).abs().sum()) for k in s) for s in steps]
    assert moved[0] > 0
    assert moved[1] == pytest.approx(moved[0], rel=1e-5)
    for k in steps[0]:
        torch.testing.assert_close(steps[0][k], steps[1][k], msg=k)


def test_critic_lr_is_its_own(tmp_path):
    learner = _learner(tmp_path, algo="ppo", lr=1e-3, critic_lr=5e-2)
    assert learner.engine.get_lr()[0] == pytest.approx(1e-3)
    assert learner.critic_engine.get_lr()[0] == pytest.approx(5e-2)
    assert _learner(tmp_path, algo="ppo", lr=1e-3).critic_engine.get_lr()[0] == pytest.approx(1e-3)


# -- 5h: infra-error episodes never reach the gradient ------------------------------------------


def test_learner_drops_infra_error_episodes(tmp_path):
    trajs = synthetic_episodes(8, infra_errors=3)
    healthy = [t for t in trajs if not t.infra_error]
    after = []
    for given in (trajs, healthy):
        learner = _learner(tmp_path, minibatch_size=8, micro_batch_size=4)
        metrics = learner.update(given, seed=0)
        after.append((learner.policy_state_dict(), metrics))
    (a, ma), (b, mb) = after
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert ma["policy_loss"] == mb["policy_loss"]
    assert ma["episodes"] == 5
    # a batch of nothing but infra errors is no update at all
    learner = _learner(tmp_path)
    assert learner.update([t for t in trajs if t.infra_error], seed=0) == {}
    assert all(torch.equal(v, tiny_policy(tiny_tokenizer()).state_dict()[k])
               for k, v in learner.policy_state_dict().items())


# -- 5a: the learner scores the distribution the engine sampled from ---------------------------


def _sharp_policy(tok):
    """The tiny policy with its weights scaled up: sharp logits, so the temperature matters."""
    policy = tiny_policy(tok)
    policy.load_state_dict({k: v if "norm" in k else 8 * v for k, v in policy.state_dict().items()})
    return policy


def test_learner_logprobs_equal_the_engines_at_temperature_07(tmp_path):
    from rollout.engine import SamplingParams, TorchEngine

    tok = tiny_tokenizer()
    engine = TorchEngine(_sharp_policy(tok), tok.pad_token_id)
    prompts = [[tok.bos_token_id] + tok.encode(text, add_special_tokens=False)
               for text in ("turn 1: say a letter\n", "turn 2: another letter\n", "a\n")]
    completions = engine.generate(prompts, SamplingParams(max_new_tokens=12, temperature=0.7, seed=1))
    trajs = []
    for i, (prompt, comp) in enumerate(zip(prompts, completions)):
        tr = Trajectory(task={"id": str(i)}, group=0)
        tr.append(prompt, policy=False)
        tr.append(list(comp.token_ids), policy=True, logprobs=list(comp.logprobs))
        trajs.append(tr)
    gaps = {}
    for temperature in (0.7, 1.0):
        exp = rl_experiment(tmp_path, algo="grpo")
        exp.rollout.temperature = temperature
        learner = Learner(exp, _sharp_policy(tok), tok.pad_token_id)
        batch = Batch.from_trajectories(trajs, tok.pad_token_id)
        old_logp, _, _ = learner.score(batch)
        on = batch.mask.bool()
        assert on.sum() >= 20
        gaps[temperature] = float((old_logp[on] - batch.behaviour_logp[on]).abs().max())
    assert gaps[0.7] < 1e-4
    assert gaps[1.0] > 1e-2  # scoring softmax(logits), as before the fix, is another distribution


def test_rl_refuses_greedy_or_top_p_sampling(tmp_path):
    from algos.config import ConfigError, load_config

    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nenv:\n  name: toy_two_turn\nrl:\n  algo: grpo\n")
    assert load_config(recipe).rollout.temperature == 1.0
    with pytest.raises(ConfigError, match="rollout.temperature must be > 0"):
        load_config(recipe, ["rollout.temperature=0"])
    with pytest.raises(ConfigError, match="rollout.top_p to 1"):
        load_config(recipe, ["rollout.top_p=0.9"])
    exp = rl_experiment(tmp_path)
    exp.rollout.top_p = 0.9
    with pytest.raises(ValueError, match="top_p"):
        Learner(exp, tiny_policy(tiny_tokenizer()), 0)


# -- 5b: the critic has no dropout ---------------------------------------------------------------


def test_critic_train_mode_output_is_deterministic():
    from transformers import AutoModelForTokenClassification

    tok = tiny_tokenizer()
    policy = tiny_policy(tok)
    ids = torch.randint(4, len(tok), (2, 16), generator=torch.Generator().manual_seed(0))
    default = AutoModelForTokenClassification.from_config(  # transformers' default head: Dropout(0.1)
        policy.config.__class__(**{**policy.config.to_dict(), "num_labels": 1}))
    for critic, deterministic in ((build_critic(policy), True), (default, False)):
        torch.nn.init.normal_(critic.score.weight)  # the built critic's zero head would hide any noise
        critic.train()
        torch.manual_seed(0)
        a = critic(input_ids=ids).logits
        b = critic(input_ids=ids).logits
        assert torch.equal(a, b) == deterministic


# -- PPO's advantages through the learner: GAE steps over observation tokens ---------------------


def test_ppo_advantages_skip_observation_tokens(tmp_path):
    # obs [bos, o1] · act [a1, a2] (reward 0.5 on a2) · obs [o2, o3] · act [a3] (reward 1.0)
    tok = tiny_tokenizer()
    tr = Trajectory(task={"id": "t"}, group=0)
    tr.append([tok.bos_token_id, 10], policy=False)
    tr.append([11, 12], policy=True, logprobs=[-1.0, -1.0])
    tr.add_turn_reward(0.5)
    tr.append([13, 14], policy=False)
    tr.append([15], policy=True, logprobs=[-1.0])
    tr.add_turn_reward(1.0)
    gamma, lam, v = 0.9, 0.8, 0.3
    learner = _learner(tmp_path, algo="ppo", gamma=gamma, lam=lam, normalize_advantages=False)
    learner.critic_engine.module.score.bias.data.fill_(v)  # V = 0.3 everywhere (the head's weight is 0)
    batch = learner.prepare([tr], fast=False)
    on = batch.mask.bool()
    torch.testing.assert_close(batch.old_values[on], torch.full((3,), v))
    # the policy's time steps are a1, a2, a3: the env's tokens between a2 and a3 are no steps
    d3 = 1.0 - v  # the last step: no next value
    d2 = 0.5 + gamma * v - v
    d1 = 0.0 + gamma * v - v
    a3 = d3
    a2 = d2 + gamma * lam * a3
    a1 = d1 + gamma * lam * a2
    torch.testing.assert_close(batch.advantages[on], torch.tensor([a1, a2, a3]))
    torch.testing.assert_close(batch.returns[on], torch.tensor([a1, a2, a3]) + v)
    assert batch.advantages[~on].abs().sum() == 0 and batch.returns[~on].abs().sum() == 0


def test_zero2_partitioned_gradients_accumulate_to_the_same_update(tmp_path):
    # ZeRO-2 reduces and partitions gradients in its own buffers: the accumulation boundary the
    # learner marks must reach them. Same update as ZeRO-0 (AdamW: DeepSpeed's ZeRO takes no SGD).
    trajs = synthetic_episodes(10)
    after = []
    for stage in (0, 2):
        exp = rl_experiment(tmp_path, algo="ppo", minibatch_size=8, micro_batch_size=3, epochs=2, lr=1e-3)
        exp.runtime.zero_stage = stage
        learner = Learner(exp, tiny_policy(tiny_tokenizer()), tiny_tokenizer().pad_token_id)
        learner.update(trajs, seed=0)
        after.append(learner.policy_state_dict())
    for k in after[0]:
        torch.testing.assert_close(after[1][k], after[0][k], rtol=0, atol=1e-6, msg=k)


def test_a_world_of_one_gets_a_fresh_port_and_a_launchers_variables_are_kept(monkeypatch):
    """Our own torch.distributed variables get a new free port before each new process group (an
    old port may be taken; a Ray task inherits its parent's); a launcher's or rank's are kept."""
    import torch.distributed as dist

    from algos.runtime import WORLD_OF_ONE, ensure_process_group_env

    if dist.is_initialized():
        pytest.skip("a process group of this test process is up")
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", WORLD_OF_ONE):
        monkeypatch.delenv(key, raising=False)
    ensure_process_group_env()
    assert os.environ[WORLD_OF_ONE] == "1" and os.environ["WORLD_SIZE"] == "1"
    ports = {os.environ["MASTER_PORT"]}
    for _ in range(3):  # inherited marked variables: a new port each time, never the old one kept
        ensure_process_group_env()
        ports.add(os.environ["MASTER_PORT"])
    assert len(ports) > 1
    monkeypatch.setenv("MASTER_PORT", "29511")  # a launcher's (or a learner rank's, which marks it "0")
    monkeypatch.setenv(WORLD_OF_ONE, "0")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    ensure_process_group_env()
    assert (os.environ["MASTER_PORT"], os.environ["RANK"], os.environ["WORLD_SIZE"]) == ("29511", "1", "2")


# -- runtime.compile -------------------------------------------------------------------------------


def test_compiled_learner_takes_the_same_step_as_the_eager_one(tmp_path):
    """runtime.compile: the policy runs compiled (on CPU with transformers' eager attention, which
    inductor fuses), the update equals the eager one within fp32 round-off, the parameters and
    their names stay the module's own, and a torch AdamW gets its fused kernel."""
    trajs = synthetic_episodes(8)
    tok = tiny_tokenizer()
    after = {}
    for compiled in (False, True):
        exp = rl_experiment(tmp_path, minibatch_size=8, micro_batch_size=8, epochs=1, lr=0.5)
        exp.runtime.compile = compiled
        learner = Learner(exp, tiny_policy(tok), tok.pad_token_id, optimizer_cls=sgd)
        assert (learner.policy._compiled_call_impl is not None) == compiled
        assert learner.policy.config._attn_implementation == ("eager" if compiled else "sdpa")
        learner.update(trajs, seed=0)
        after[compiled] = learner.policy_state_dict()
    start = tiny_policy(tok).state_dict()
    assert after[True].keys() == after[False].keys() == start.keys()
    assert any(not torch.allclose(after[True][k], start[k]) for k in start)
    for k in start:
        torch.testing.assert_close(after[True][k] - start[k], after[False][k] - start[k], rtol=1e-3, atol=1e-6,
                                   msg=k)
    exp = rl_experiment(tmp_path)
    exp.runtime.compile = True
    optimizer = Learner(exp, tiny_policy(tok), tok.pad_token_id).engine.optimizer
    assert getattr(optimizer, "optimizer", optimizer).defaults["fused"] is True


def test_compile_refuses_zero_3(tmp_path):
    from algos.config import Experiment

    cfg = rl_experiment(tmp_path).model_dump()
    cfg["runtime"].update(compile=True, zero_stage=3)
    with pytest.raises(ValueError, match="runtime.compile=true cannot run with runtime.zero_stage=3"):
        Experiment.model_validate(cfg)
