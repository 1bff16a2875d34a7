"""Shared pieces of the RL tests: a two-turn toy env, a tiny tokenizer and policy, an RL config."""
from __future__ import annotations

import string
import time

from pydantic import Field

import envs
from agents.model import ModelConfig, build_model
from agents.tokenizer import TokenizerConfig, train_tokenizer
from algos.config import Experiment
from envs.base import BaseEnvConfig, TaskSource, TextEnv, make_info
from envs.countdown.format import SearchLineFormat

# Turn t wants a line that starts with one of GOOD[t]; a random policy wins both turns ~5% of the time.
GOOD = (string.ascii_letters + string.digits, string.ascii_lowercase)


class ToyConfig(BaseEnvConfig):
    fail_on: str = Field("", description="'step' raises on the second turn, 'hang' sleeps past the timeout")
    hang_s: float = 2.0


class ToyTasks(TaskSource):
    def __init__(self, config: ToyConfig):
        self.config = config

    def splits(self):
        return ["train", "valid", "heldout"]

    def tasks(self, split):  # disjoint splits: train n = 0..3, valid 10..11, heldout 20..21
        first = {"train": 0, "valid": 10, "heldout": 20}[split]
        return [{"id": f"{split}{i}", "n": first + i} for i in range(4 if split == "train" else 2)]


class ToyEnv(TextEnv):
    """Two turns. Dense: 0.5 per good turn. Sparse: 1.0 when both turns were good."""

    def __init__(self, config: ToyConfig):
        super().__init__()
        self.config = config

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.turn, self.good = 0, 0
        return "turn 1: say a letter", make_info(False, {})

    def step(self, action: str):
        if self.turn == 1 and self.config.fail_on == "step":
            raise RuntimeError("the toy env broke")
        if self.turn == 1 and self.config.fail_on == "hang":
            time.sleep(self.config.hang_s)
        ok = bool(action) and action[0] in GOOD[self.turn]
        self.good += ok
        self.turn += 1
        done = self.turn == 2
        won = done and self.good == 2
        reward = 0.5 * ok if self.config.reward_density == "dense" else float(won)
        obs = "" if done else "turn 2: another letter"
        return obs, reward, done, False, make_info(won, {"good": float(ok)})


def register_toy_env() -> None:
    """Registers the toy env (on import here; Ray workers of the async tests call it as their setup hook)."""
    if "toy_two_turn" not in envs.list_envs():
        envs.register("toy_two_turn", ToyEnv, ToyConfig, ToyTasks, format=SearchLineFormat())


register_toy_env()

_TOKENIZER = None


def tiny_tokenizer():
    global _TOKENIZER
    if _TOKENIZER is None:
        corpus = ["turn 1: say a letter\n", "turn 2: another letter\n"] + [f"{c}\n" for c in "abcdefghstuvwxyz"]
        _TOKENIZER = train_tokenizer(corpus * 20, TokenizerConfig(vocab_size=300))
    return _TOKENIZER


def tiny_policy(tokenizer, seed: int = 0, hidden: int = 64):
    import torch

    torch.manual_seed(seed)
    cfg = ModelConfig(hidden_size=hidden, num_layers=2, num_heads=2, max_seq_len=256)
    return build_model(cfg, len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id,
                       tokenizer.eos_token_id)


def rl_experiment(tmp_path, env: str = "toy_two_turn", **rl) -> Experiment:
    cfg = {"algo": "grpo", "iterations": 4, "tasks_per_iter": 4, "group_size": 8, "minibatch_size": 32,
           "micro_batch_size": 16, "lr": 3e-3, "eval_every": 0, "save_every": 2, "eval_tasks": 4}
    cfg.update(rl)
    return Experiment.model_validate({
        "name": "rltest", "out_dir": str(tmp_path / "run"), "data_dir": str(tmp_path / "data"),
        "env": {"name": env}, "runtime": {"device": "cpu"}, "rl": cfg, "eval": {"split": "heldout"},
        "rollout": {"num_workers": 0, "max_turn_tokens": 3, "temperature": 1.0},
        "model": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "max_seq_len": 256},
    })
