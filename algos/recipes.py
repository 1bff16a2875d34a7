"""The jobs `launch.py` runs, each a short function that builds parts and hands them on.

    gen_data(exp)                -> task splits + demonstrations on disk
    sft(exp, resume)             -> data, tokenizer, SFT, then the held-out evaluation
    train(exp, resume)           -> SFT (unless its policy exists), then RL (when the recipe has `rl`)
    evaluate(exp, checkpoint,..) -> a checkpoint on a held-out split or a user's task file
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

import envs
from agents.tokenizer import train_tokenizer
from algos.checkpoint import latest_checkpoint, load_policy, policy_folder
from algos.config import Experiment, save_config
from algos.data import heldout_tasks, prepare_data, read_jsonl
from algos.evaluate import evaluate_episodes, evaluate_policy, print_summary, save_eval
from algos.metrics import MetricsLogger
from algos.rl import train_rl
from algos.run_folder import holds_run_folder
from algos.runtime import apply_threads, param_dtype, resolve_runtime, seed_everything
from algos.sft import Example, train_sft


def gen_data(exp: Experiment) -> Path:
    """Data preparation: the env's own (SWE fetches its pinned projects and synthesizes; the only
    step that may download), then the task splits and demonstrations."""
    env_stats = envs.prepare(exp.env.name, **exp.env_options())
    if env_stats:
        top = {k: v for k, v in env_stats.items() if not isinstance(v, (dict, list))}
        tqdm.write(f"{exp.env.name} data prepared: {json.dumps(top)}")
    folder = prepare_data(exp)
    print(json.dumps(json.loads((folder / "stats.json").read_text()), indent=2))
    return folder


def build_tokenizer(exp: Experiment, demos: list[dict], run_dir: Path):
    """The run's tokenizer: trained on its demonstrations once, then reloaded (resume, eval); the
    start policy's own when sft.init_from names one (its embeddings index that vocabulary)."""
    from transformers import AutoTokenizer

    if exp.sft.init_from:
        return AutoTokenizer.from_pretrained(policy_folder(exp.sft.init_from))
    folder = run_dir / "tokenizer"
    if (folder / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(folder)
    fmt = envs.format_for(exp.env.name)
    texts = ("".join(text for text, _ in fmt.segments(d)) for d in demos)
    tok = train_tokenizer(texts, exp.tokenizer)
    tok.save_pretrained(folder)
    return tok


def build_examples(exp: Experiment, demos: list[dict], tokenizer) -> list[Example]:
    """<bos> + the demo's segments + <eos>; loss on the policy's segments and <eos>.

    Each segment is tokenised on its own, as the episode runner does turn by turn, so SFT and
    play see the same ids. Demos longer than model.max_seq_len are dropped (and counted).
    """
    fmt = envs.format_for(exp.env.name)
    per_demo = [fmt.segments(d) for d in demos]
    flat = [text for segs in per_demo for text, _ in segs]
    flat_ids = iter(tokenizer(flat, add_special_tokens=False)["input_ids"]) if flat else iter(())
    bos, eos, limit = tokenizer.bos_token_id, tokenizer.eos_token_id, exp.model.max_seq_len
    examples = []
    for segs in per_demo:
        ids, mask = [bos], [0]
        for _, policy in segs:
            seg = next(flat_ids)
            ids += seg
            mask += [int(policy)] * len(seg)
        ids.append(eos)
        mask.append(1)
        if len(ids) <= limit:
            examples.append(Example(ids, mask))
    dropped = len(demos) - len(examples)
    if dropped:
        tqdm.write(f"dropped {dropped} of {len(demos)} demonstrations longer than model.max_seq_len={limit} tokens")
    if not examples:
        raise ValueError(f"every demonstration is longer than model.max_seq_len={limit}; raise it")
    return examples


@holds_run_folder
def sft(exp: Experiment, resume: bool = False) -> dict:
    """Generate data, train the tokenizer and the policy (evaluated on the valid split every
    sft.eval_every steps), then evaluate it on the test split (eval.split)."""
    seed_everything(exp.seed)
    apply_threads(exp.runtime)
    run_dir = Path(exp.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(exp, run_dir / "config.yaml")
    demos = read_jsonl(prepare_data(exp) / "train_demos.jsonl")
    tokenizer = build_tokenizer(exp, demos, run_dir)
    examples = build_examples(exp, demos, tokenizer)

    periodic_tasks = heldout_tasks(exp, envs.VALID_SPLIT, limit=exp.sft.eval_tasks)[1] if exp.sft.eval_every else []

    def periodic_eval(model, step: int) -> dict:
        summary, _ = run_eval(exp, model, tokenizer, periodic_tasks, desc=f"eval@{step}")
        tqdm.write(f"step {step}: valid accuracy {summary['accuracy']:.1%} on {summary['tasks']} tasks")
        return {"accuracy": summary["accuracy"], "mean_tokens": summary["mean_tokens"]}

    ckpt = train_sft(exp, examples, tokenizer, run_dir, resume=resume, evaluate=periodic_eval)
    summary = evaluate(exp, ckpt)
    log = MetricsLogger(run_dir)
    log.log(exp.sft.steps, {k: v for k, v in summary.items() if isinstance(v, (int, float))}, prefix="eval/")
    log.close()
    return summary


def run_eval(exp: Experiment, model, tokenizer, tasks: list[dict], desc: str = "eval") -> tuple[dict, list[dict]]:
    """Single-turn envs: one batched generation; multi-turn envs: the episode runner."""
    if envs.format_for(exp.env.name).multi_turn:
        return evaluate_episodes(model, tokenizer, exp.env.name, exp.env_options(), tasks, exp.eval, exp.rollout,
                                 exp.model.max_seq_len)
    return evaluate_policy(model, tokenizer, exp.env.name, exp.env_options(), tasks, exp.eval, desc=desc)


def sft_policy_folder(exp: Experiment) -> Path:
    return Path(exp.rl.init_from) if exp.rl and exp.rl.init_from else Path(exp.out_dir) / "sft"


@holds_run_folder
def train(exp: Experiment, resume: bool = False) -> dict:
    """The recipe end to end: SFT (skipped when its policy exists), then the RL stage if any."""
    if exp.rl is None:
        return sft(exp, resume=resume)
    init = sft_policy_folder(exp)
    before = None
    if not _sft_finished(init, exp.sft.steps):
        _refuse_other_finished_sft(init, exp.sft.steps)
        print(f"no finished SFT policy in {init}: running the recipe's SFT stage there first")
        summary = sft(exp.model_copy(update={"out_dir": str(init)}), resume=True)
        # The SFT stage just played the same held-out tasks greedily: that is the RL start.
        if not exp.eval.problems_file:  # the same test split (eval.split, eval.num_tasks) as RL's before
            before = summary
    return train_rl(exp, init, resume=resume, before=before)


def _checkpoint_step(folder: Path) -> int | None:
    """The step of a run folder's newest complete checkpoint (None: not a run folder, or none yet)."""
    ck = latest_checkpoint(folder) if (folder / "checkpoints").is_dir() else None
    return None if ck is None else torch.load(ck / "state.pt", weights_only=False).get("step", 0)


def _sft_finished(folder: Path, steps: int) -> bool:
    """A run folder whose newest checkpoint reached `steps`, or any plain policy folder."""
    if (folder / "checkpoints").is_dir():
        done = _checkpoint_step(folder)
        return done is not None and done >= steps
    return (folder / "config.json").exists() or (folder / "model" / "config.json").exists()


def _refuse_other_finished_sft(folder: Path, steps: int) -> None:
    """Resuming the SFT stage in rl.init_from is for a killed run. A folder whose SFT run finished
    at another sft.steps is someone's finished policy: extending it to `steps` (with a learning-rate
    schedule it was not trained under) would silently replace it."""
    done = _checkpoint_step(folder)
    if done is None or not (folder / "config.yaml").exists():
        return
    saved = (yaml.safe_load((folder / "config.yaml").read_text()) or {}).get("sft", {}).get("steps")
    if isinstance(saved, int) and saved != steps and done >= saved:
        raise ValueError(f"rl.init_from={str(folder)!r} holds a finished SFT run of {saved} steps, but this recipe "
                         f"asks for sft.steps={steps}: set rl.init_from to a new folder to train that SFT, or "
                         f"sft.steps={saved} to start RL from the finished one")


def evaluate(exp: Experiment, checkpoint: str | Path, split: str | None = None,
             problems_file: str | None = None) -> dict:
    """Run `checkpoint` on a held-out split (default eval.split) or a task file; table + JSON."""
    apply_threads(exp.runtime)
    device = resolve_runtime(exp.runtime)
    dtype = param_dtype(exp.runtime.precision) if device.type == "cuda" else torch.float32
    model, tokenizer = load_policy(checkpoint, device=device, dtype=dtype)
    name, tasks = heldout_tasks(exp, split, problems_file or exp.eval.problems_file, exp.eval.num_tasks)
    summary, records = run_eval(exp, model, tokenizer, tasks)
    out = Path(exp.out_dir) / "eval" / f"{Path(name).stem}.json"
    save_eval(out, summary, records, {"checkpoint": str(checkpoint), "split": name})
    print_summary(f"{exp.name}: {checkpoint}", {name: summary})
    print(f"results: {out}")
    return summary
