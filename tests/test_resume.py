"""Kill-and-resume: a PPO run (critic, several mini-batches, two epochs, LR warmup) resumed from
its checkpoint ends exactly where the uninterrupted run does, also when the kill lands during a
checkpoint write; and the metrics log holds each iteration once."""
from __future__ import annotations

import json

import pytest
import torch
from rl_helpers import rl_experiment, tiny_policy, tiny_tokenizer
from safetensors.torch import load_file

import algos.checkpoint
from algos.checkpoint import COMPLETE, latest_checkpoint
from algos.metrics import MetricsLogger
from algos.rl import train_rl

PPO = dict(algo="ppo", iterations=4, save_every=2, tasks_per_iter=4, group_size=4, minibatch_size=6,
           micro_batch_size=4, epochs=2, warmup_steps=3, lr=3e-3, critic_lr=1e-2)


def _policy_folder(path):
    tok = tiny_tokenizer()
    tiny_policy(tok).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _final_weights(run_dir):
    ck = latest_checkpoint(run_dir)
    policy = load_file(ck / "model" / "model.safetensors")
    critic = torch.load(ck / "critic" / "state" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    return policy, critic


def _train_steps(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "train/mean_return" in r]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo")
    folder = _policy_folder(root / "start")
    exp = rl_experiment(root / "full", **PPO)
    train_rl(exp, folder)
    return folder, _final_weights(exp.out_dir)


def _assert_same(run_dir, uninterrupted):
    folder, (policy, critic) = uninterrupted
    got_policy, got_critic = _final_weights(run_dir)
    assert policy.keys() == got_policy.keys() and critic.keys() == got_critic.keys()
    assert all(torch.equal(policy[k], got_policy[k]) for k in policy)
    assert all(torch.equal(critic[k], got_critic[k]) for k in critic)
    start = load_file(folder / "model.safetensors")
    assert any(not torch.equal(policy[k], start[k]) for k in start)  # training did change the policy


def test_ppo_resume_after_a_kill_between_checkpoints(tmp_path, uninterrupted):
    folder, _ = uninterrupted
    cut = rl_experiment(tmp_path, **PPO)
    assert train_rl(cut, folder, stop_after=3)["stopped_at"] == 3  # killed after iteration 3
    assert latest_checkpoint(cut.out_dir).name == "step_0000002"  # iteration 3 is lost
    assert _train_steps(tmp_path / "run") == [1, 2, 3]
    train_rl(cut, folder, resume=True)
    _assert_same(cut.out_dir, uninterrupted)
    # iteration 3 was logged by both halves: the resumed log holds it once
    assert _train_steps(tmp_path / "run") == [1, 2, 3, 4]


def test_ppo_resume_after_a_kill_during_a_checkpoint_write(tmp_path, uninterrupted, monkeypatch):
    folder, _ = uninterrupted
    real_save_policy = algos.checkpoint.save_policy

    def killed_at_step_4(engine, tokenizer, path):
        if "step_0000004" in str(path):
            raise KeyboardInterrupt("killed while writing the checkpoint")
        real_save_policy(engine, tokenizer, path)

    monkeypatch.setattr(algos.checkpoint, "save_policy", killed_at_step_4)
    cut = rl_experiment(tmp_path, **PPO)
    with pytest.raises(KeyboardInterrupt):
        train_rl(cut, folder)
    half_written, step_4 = tmp_path / "run" / "checkpoints" / ".partial_step_0000004", tmp_path / "run" / "checkpoints" / "step_0000004"
    assert (half_written / "learner").is_dir() and not (half_written / COMPLETE).exists()
    assert not step_4.exists()  # renamed into place only when complete
    assert latest_checkpoint(cut.out_dir).name == "step_0000002"  # the half-written one is never used
    monkeypatch.setattr(algos.checkpoint, "save_policy", real_save_policy)
    train_rl(cut, folder, resume=True)
    assert (step_4 / COMPLETE).exists() and not half_written.exists()
    _assert_same(cut.out_dir, uninterrupted)
    assert _train_steps(tmp_path / "run") == [1, 2, 3, 4]


def test_metrics_log_drops_rows_past_the_resumed_step(tmp_path):
    log = MetricsLogger(tmp_path)
    for step in range(6):
        log.log(step, {"x": float(step)})
    log.close()
    log = MetricsLogger(tmp_path, resume_from=3)
    log.log(4, {"x": 40.0})
    log.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["x"]) for r in rows] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    MetricsLogger(tmp_path).close()  # not resuming: append
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 5
    MetricsLogger(tmp_path, resume_from=0).close()  # resuming from step 0: a fresh log
    assert (tmp_path / "metrics.jsonl").read_text() == ""
