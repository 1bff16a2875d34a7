"""An environment is one registration: a toy env defined in this file alone runs the whole command
line (sft, train, eval) without any other package knowing about it."""
import json
import random

from pydantic import Field

import envs
import launch
from envs import BaseEnvConfig, DemoOptions, Format, TaskSource, TextEnv, make_info

# Task i asks for the two letters WORDS[i % len(WORDS)], one per turn.
WORDS = ["ab", "cd", "ef", "gh", "ij", "kl"]
PLAYED: list[str] = []  # ids of the tasks the env was reset with, in order


class SpellConfig(BaseEnvConfig):
    train_size: int = Field(12, ge=1)


class SpellTasks(TaskSource):
    """train, valid and test: disjoint task numbers (task_key ignores the id, so `n` decides)."""

    first = {"train": 0, "valid": 1000, "test": 2000}

    def __init__(self, config: SpellConfig):
        self.config = config

    def splits(self):
        return ["train", "valid", "test"]

    def tasks(self, split):
        self._check_split(split)
        size = self.config.train_size if split == "train" else 3
        return [{"id": f"{split}/{i}", "n": self.first[split] + i} for i in range(size)]


class SpellEnv(TextEnv):
    """Two turns: write the word's first letter, then its second; won when both are right."""

    def __init__(self, config: SpellConfig):
        super().__init__()
        self.config = config

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.task = options["task"]
        PLAYED.append(self.task["id"])
        self.word, self.turn, self.right = WORDS[self.task["n"] % len(WORDS)], 0, 0
        return f"spell {self.word}: letter 1", make_info(False, {})

    def step(self, action):
        ok = action == self.word[self.turn]
        self.right += ok
        self.turn += 1
        done = self.turn == 2
        won = done and self.right == 2
        return ("" if done else "letter 2"), float(won), done, False, make_info(won, {"right": float(ok)})


class SpellFormat(Format):
    """A line per turn (Format's defaults); demos are the two turns."""

    def segments(self, demo):
        return [text for obs, letter in demo["turns"] for text in ((obs + "\n", False), (letter + "\n", True))]


class SpellDemoOptions(DemoOptions):
    shout: bool = False  # an option only this env's demos take (upper-case letters)


def spell_demos(source, split, n, seed, start=0, shout=False):
    """Tasks [start, n), one demo each (a builder yields None for a task whose demo it drops)."""
    for i, task in enumerate((source.tasks(split) * n)[start:n], start):
        word = WORDS[task["n"] % len(WORDS)]
        letters = word.upper() if shout else word
        r = random.Random(f"{seed}/{i}").random()  # drawn per task: a resumed run draws the same
        yield {"turns": [[f"spell {word}: letter 1", letters[0]], ["letter 2", letters[1]]], "r": r}


envs.register("spell", SpellEnv, SpellConfig, SpellTasks, format=SpellFormat(), demos=spell_demos,
              demo_options=SpellDemoOptions, demo_stats=lambda demos: {"spell_demos": len(demos)},
              eval_stats=lambda records: {"spell_wins": sum(r["won"] for r in records)})

RECIPE = """
name: spell
env: {{name: spell, train_size: 12}}
tokenizer: {{vocab_size: 300}}
model: {{hidden_size: 64, num_layers: 1, num_heads: 2, max_seq_len: 64}}
runtime: {{device: cpu}}
sft:
  demos: {{num_examples: 24, shout: false}}
  steps: 4
  batch_size: 8
  lr: 3.0e-3
  warmup_steps: 1
  log_every: 1
  save_every: 4
  eval_every: 2
  eval_tasks: 2
eval: {{split: test, batch_size: 4}}
rollout: {{num_workers: 0, max_turn_tokens: 3, temperature: 1.0}}
rl: {{algo: grpo, iterations: 2, tasks_per_iter: 2, group_size: 2, minibatch_size: 4, micro_batch_size: 4,
     lr: 1.0e-3, eval_every: 1, eval_tasks: 2, save_every: 2, init_from: {sft}}}
out_dir: {out}
data_dir: {data}
"""


def test_a_toy_env_registered_here_runs_sft_train_and_eval(tmp_path):
    recipe = tmp_path / "spell.yaml"
    recipe.write_text(RECIPE.format(sft=tmp_path / "sft", out=tmp_path / "rl", data=tmp_path / "data"))

    PLAYED.clear()
    assert launch.main(["sft", str(recipe), f"out_dir={tmp_path / 'sft'}"]) == 0
    # the periodic eval (step 2) played valid tasks, the final one the test split, nothing else
    assert {t.split("/")[0] for t in PLAYED} == {"valid", "test"}
    assert PLAYED.index("test/0") > PLAYED.index("valid/0")
    sft_eval = json.loads((tmp_path / "sft" / "eval" / "test.json").read_text())
    assert sft_eval["split"] == "test" and sft_eval["summary"]["tasks"] == 3
    assert "spell_wins" in sft_eval["summary"]  # the env's own eval statistics
    (data,) = (tmp_path / "data").iterdir()
    assert json.loads((data / "stats.json").read_text())["spell_demos"] == 24  # the env's own demo statistics
    assert (data / "valid.jsonl").exists() and (data / "test.jsonl").exists()

    PLAYED.clear()
    assert launch.main(["train", str(recipe)]) == 0
    # RL plays train tasks, its periodic eval (iteration 1) valid ones, before and after: the test split
    assert {t.split("/")[0] for t in PLAYED} == {"train", "valid", "test"}
    rl_eval = json.loads((tmp_path / "rl" / "eval" / "test_rl.json").read_text())
    # the whole test split (eval.num_tasks unset), whatever rl.eval_tasks (2) gives the valid eval
    assert rl_eval["split"] == "test" and rl_eval["summary"]["tasks"] == 3
    assert "spell_wins" in rl_eval["summary"] and "spell_wins" in rl_eval["before"]  # the env's stats in RL evals too
    rows = [json.loads(line) for line in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 2 and any("valid/accuracy" in r for r in rows)

    assert launch.main(["eval", str(recipe), "--checkpoint", str(tmp_path / "rl"), "--split", "valid"]) == 0
    assert json.loads((tmp_path / "rl" / "eval" / "valid.json").read_text())["summary"]["tasks"] == 3


def test_a_demo_option_of_another_env_is_refused_by_name(tmp_path, capsys):
    recipe = tmp_path / "spell.yaml"
    recipe.write_text(RECIPE.format(sft=tmp_path / "sft", out=tmp_path / "rl", data=tmp_path / "data"))
    assert launch.main(["sft", str(recipe), "sft.demos.beams=[1]"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'sft.demos.beams' (command-line override)" in err and "shout" in err
