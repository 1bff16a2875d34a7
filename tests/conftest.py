import os

# Tests run on CPU, quietly, and never build DeepSpeed native ops (a torch optimizer is passed).
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Tiny models gain nothing from several threads; one per test process also lets pytest-xdist
# spread tests over the cores without oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

TINY_RECIPE = """
name: tiny
seed: 0
env:
  name: countdown
  num_inputs: 3
  max_number: 20
  heldout_size: 40
  train_size: 2000
tokenizer:
  vocab_size: 320
model:
  hidden_size: 64
  num_layers: 2
  num_heads: 2
  max_seq_len: 512
runtime:
  device: cpu
sft:
  demos:
    num_examples: 300
    strategies: [dfs]
    heuristics: [sum]
  steps: 4
  batch_size: 8
  lr: 3.0e-3
  warmup_steps: 1
  log_every: 1
  save_every: 2
eval:
  num_tasks: 8
  batch_size: 8
  max_new_tokens: 64
"""


@pytest.fixture
def tiny_recipe(tmp_path: Path) -> Path:
    """A tiny Countdown recipe whose run and data folders live in tmp_path."""
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_RECIPE + f"out_dir: {tmp_path / 'run'}\ndata_dir: {tmp_path / 'data'}\n")
    return path
