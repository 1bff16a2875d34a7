"""SFT: the loss mask, learning, checkpoints, and exact resume after a crash."""
import json

import pytest
import torch

from agents.tokenizer import TokenizerConfig, train_tokenizer
from algos import recipes
from algos.checkpoint import COMPLETE, CheckpointError, latest_checkpoint, load_policy
from algos.config import load_config
from algos.data import prepare_data, read_jsonl
from algos.sft import IGNORE, collate, train_sft
from envs import format_for


def _setup(recipe, *overrides):
    exp = load_config(recipe, list(overrides))
    demos = read_jsonl(prepare_data(exp, progress=False) / "train_demos.jsonl")
    from pathlib import Path

    run_dir = Path(exp.out_dir)
    tok = recipes.build_tokenizer(exp, demos, run_dir)
    return exp, tok, recipes.build_examples(exp, demos, tok), run_dir


def test_tokenizer_is_trained_here_and_round_trips(tmp_path):
    texts = ["Current State: 47:[42, 61, 66], Operations: []", "Exploring Operation: 66-42=24"] * 50
    tok = train_tokenizer(texts, TokenizerConfig(vocab_size=300))
    assert tok.decode(tok.encode(texts[1], add_special_tokens=False)) == texts[1]
    # one token per digit: '66' is two tokens, whatever the corpus frequency
    assert len(tok.encode("66", add_special_tokens=False)) == 2
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.encode(texts[0]) == tok.encode(texts[0]) and again.eos_token == "<eos>"


def test_phrase_tokens_never_cross_a_line_and_end_a_turn_for_the_runner():
    from envs.countdown.search import dfs_stream
    from rollout.runner import EpisodeRunner, RolloutConfig

    streams = [dfs_stream([a, b, c], t) for a, b, c, t in [(2, 10, 8, 36), (4, 9, 10, 86), (3, 7, 5, 22)]] * 30
    phrase = train_tokenizer(streams, TokenizerConfig(vocab_size=400))
    words = train_tokenizer(streams, TokenizerConfig(vocab_size=400, merge_phrases=False))
    line = "Exploring Operation: 2*10=20, Resulting Numbers: [8, 20]\n"
    assert phrase.tokenize(line)[0] == phrase.tokenize("Exploring Operation: ")[0]  # one token
    assert len(phrase.encode(streams[0])) < 0.75 * len(words.encode(streams[0]))
    pieces = [phrase.decode([i]) for i in phrase.encode("".join(streams[:3]), add_special_tokens=False)]
    assert all("\n" not in p[:-1] for p in pieces)  # a newline only ever ends a token
    # the line's last token carries its newline: the runner must stop on it, not only on "\n"
    last = phrase.encode(line, add_special_tokens=False)[-1]
    assert phrase.decode([last]) != "\n" and phrase.decode([last]).endswith("\n")
    runner = EpisodeRunner(None, phrase, lambda: None, format_for("countdown_search"),
                           RolloutConfig(num_workers=0), 64)
    assert last in runner.stop_ids and phrase.eos_token_id in runner.stop_ids
    runner.close()


def test_loss_mask_covers_only_the_completion(tiny_recipe):
    exp, tok, examples, _ = _setup(tiny_recipe)
    e = examples[0]
    prompt_len = e.loss_mask.index(1)
    text_before = tok.decode(e.input_ids[:prompt_len], skip_special_tokens=True)
    assert text_before.startswith("Current State:") and text_before.count("\n") == 1  # the prompt line only
    assert e.input_ids[-1] == tok.eos_token_id and e.loss_mask[-1] == 1
    batch = collate(examples[:4], tok.pad_token_id, "cpu")
    labels = batch["labels"][0]
    assert (labels[:prompt_len] == IGNORE).all() and (labels[prompt_len : len(e.input_ids)] != IGNORE).all()
    assert (labels[len(e.input_ids) :] == IGNORE).all()  # padding never trains


def test_sft_lowers_the_loss(tiny_recipe):
    exp, tok, examples, run_dir = _setup(tiny_recipe, "sft.steps=50", "sft.save_every=50", "sft.log_every=5")
    train_sft(exp, examples, tok, run_dir, progress=False)
    losses = [row["sft/loss"] for row in map(json.loads, open(run_dir / "metrics.jsonl"))]
    assert losses[-1] < 0.6 * losses[0]


def _params(folder):
    model, _ = load_policy(folder)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_crash_then_resume_equals_an_uninterrupted_run(tiny_recipe, tmp_path):
    exp, tok, examples, run_dir = _setup(tiny_recipe, "sft.steps=4", "sft.save_every=2")
    straight = train_sft(exp, examples, tok, run_dir, progress=False)

    crash_dir = tmp_path / "crashed"

    def crash(model, step):  # the periodic eval at step 2 "kills" the run after its checkpoint
        raise KeyboardInterrupt

    crash_exp = exp.model_copy(update={"sft": exp.sft.model_copy(update={"eval_every": 2})})
    with pytest.raises(KeyboardInterrupt):
        train_sft(crash_exp, examples, tok, crash_dir, evaluate=crash, progress=False)
    assert latest_checkpoint(crash_dir).name == "step_0000002"
    resumed = train_sft(exp, examples, tok, crash_dir, resume=True, progress=False)
    assert resumed.name == straight.name == "step_0000004"
    a, b = _params(straight), _params(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and the optimizer state came back too: a fresh optimizer from step 2 would give other weights
    state = torch.load(resumed / "state.pt", weights_only=False)
    assert state["step"] == 4


def test_incomplete_checkpoint_is_ignored_and_garbage_is_refused(tiny_recipe, tmp_path):
    exp, tok, examples, run_dir = _setup(tiny_recipe, "sft.steps=2", "sft.save_every=1")
    train_sft(exp, examples, tok, run_dir, progress=False)
    (run_dir / "checkpoints" / "step_0000002" / COMPLETE).unlink()  # as if killed mid-save
    (run_dir / "checkpoints" / "latest").unlink()
    assert latest_checkpoint(run_dir).name == "step_0000001"
    with pytest.raises(CheckpointError, match="not found"):
        load_policy(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="cannot load the policy"):
        load_policy(broken)


def test_a_killed_data_step_resumes_at_the_next_task_and_writes_what_a_whole_run_writes(tiny_recipe, monkeypatch):
    """Demonstrations are written as they come with a progress record; a rerun after a kill cuts
    the part file back to the record, asks the builder only for the tasks after it, and ends with
    the same file (and counts) as an uninterrupted run, dropped tasks included."""
    import algos.data
    import envs

    real = envs.demos_by_task
    asked: list[int] = []

    def dropping(*args, start=0, **kw):  # every 7th task's demo dropped, as an env drops unwon ones
        asked.append(start)
        for i, d in enumerate(real(*args, start=start, **kw), start):
            yield None if i % 7 == 3 else d

    monkeypatch.setattr(envs, "demos_by_task", dropping)
    monkeypatch.setattr(algos.data, "PROGRESS_EVERY_S", 0.0)  # record after every task
    whole = load_config(tiny_recipe, ["data_dir=" + str(tiny_recipe.parent / "whole")])
    expected = (prepare_data(whole, progress=False) / "train_demos.jsonl").read_text()
    assert asked == [0] and len(expected.splitlines()) == 300 - 43  # tasks 3, 10, ..., 297 dropped

    def killed(*args, start=0, **kw):
        for i, d in enumerate(dropping(*args, start=start, **kw), start):
            if i == 120:
                raise KeyboardInterrupt
            yield d

    exp = load_config(tiny_recipe)
    monkeypatch.setattr(envs, "demos_by_task", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(exp, progress=False)
    folder = algos.data.data_folder(exp)
    assert not (folder / "DONE").exists() and not (folder / "train_demos.jsonl").exists()
    record = json.loads((folder / "train_demos.progress.json").read_text())
    assert record["tasks"] == 120 and record["demos"] == 120 - 17
    with open(folder / "train_demos.jsonl.part", "a") as f:
        f.write('{"half a line')  # the kill landed mid-write: cut back to the record
    asked.clear()
    monkeypatch.setattr(envs, "demos_by_task", dropping)
    prepare_data(exp, progress=False)
    assert asked == [120]  # only the tasks after the record were played again
    assert (folder / "train_demos.jsonl").read_text() == expected
    assert json.loads((folder / "stats.json").read_text())["demonstrations"] == 300 - 43
    assert not (folder / "train_demos.jsonl.part").exists() and not (folder / "train_demos.progress.json").exists()
