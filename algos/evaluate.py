"""Held-out evaluation: play each task once with the policy and report what happened.

Single-turn environments (Countdown streams) are evaluated in one batched generation: every
prompt goes to the engine together, then each completion is scored by the environment.
Multi-turn environments are played by the episode runner (rollout/runner.py), greedy, and
summarised by `summarize` — the same summary the RL loop logs for training and held-out evals.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm.auto import tqdm

import envs
from algos.config import EvalConfig
from rollout.engine import SamplingParams, TorchEngine
from rollout.runner import EpisodeRunner


def engine_for(model, tokenizer, cfg: EvalConfig) -> TorchEngine:
    """An embedded engine around `model` as it is (its device and dtype), batched by eval.batch_size."""
    p = next(model.parameters())
    return TorchEngine(model, tokenizer.pad_token_id, device=p.device, dtype=p.dtype, max_batch_size=cfg.batch_size)


def evaluate_policy(model, tokenizer, env_name: str, env_options: dict, tasks: list[dict], cfg: EvalConfig,
                    progress: bool = True, desc: str = "eval") -> tuple[dict, list[dict]]:
    """(summary metrics, one record per task); the env's own eval_stats join the summary."""
    if not tasks:
        raise ValueError("no tasks to evaluate")
    fmt = envs.format_for(env_name)
    env = envs.make(env_name, **env_options)
    observations, prompts = [], []
    for task in tasks:
        obs, _ = env.reset(options={"task": task})
        observations.append(obs)
        prompts.append([tokenizer.bos_token_id] + tokenizer.encode(fmt.prompt(obs), add_special_tokens=False))

    engine = engine_for(model, tokenizer, cfg)
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            stop_token_ids=(tokenizer.eos_token_id,), seed=0)
    completions, gen_seconds = [], 0.0
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, dynamic_ncols=True, leave=False)
    for start in range(0, len(prompts), cfg.batch_size):
        t0 = time.perf_counter()
        completions += engine.generate(prompts[start : start + cfg.batch_size], params)
        gen_seconds += time.perf_counter() - t0
        bar.update(min(cfg.batch_size, len(prompts) - start))
    bar.close()

    records = []
    for task, obs, comp in zip(tasks, observations, completions):
        text = tokenizer.decode(comp.token_ids, skip_special_tokens=True)
        env.reset(options={"task": task})
        _, reward, _, _, info = env.step(fmt.action(obs, text))
        records.append({"task": task, "won": info["won"], "reward": reward, "reason": info.get("reason", ""),
                        "tokens": len(comp.token_ids), "finish_reason": comp.finish_reason, "completion": text})
    n = len(records)
    gen_tokens = sum(r["tokens"] for r in records)
    summary = {
        "tasks": n,
        "accuracy": sum(r["won"] for r in records) / n,
        "mean_tokens": gen_tokens / n,
        "mean_chars": sum(len(r["completion"]) for r in records) / n,
        "truncated": sum(r["finish_reason"] == "length" for r in records) / n,
        "tokens_per_s": gen_tokens / max(gen_seconds, 1e-9),
        "seconds": gen_seconds,
    }
    return {**summary, **env_eval_stats(env_name, records)}, records


def env_eval_stats(env_name: str, records: list[dict]) -> dict:
    """The statistics only the env knows how to compute from an evaluation's records."""
    stats = envs.spec(env_name).eval_stats
    return stats(records) if stats is not None else {}


def summarize(trajs, stats: dict) -> dict:
    """What a set of played episodes did: the RL loop's training metrics and every held-out eval
    of episodes. Infra-error episodes are counted, never scored."""
    scored = [t for t in trajs if not t.infra_error]
    n = max(len(scored), 1)
    policy_tokens = sum(t.num_policy_tokens for t in scored)
    generate_s, env_s = stats.get("generate_s", 0.0), stats.get("env_s", 0.0)
    return {
        "tasks": len(scored),
        "accuracy": sum(t.won for t in scored) / n,
        "mean_return": sum(t.episode_return for t in scored) / n,
        "mean_turns": sum(t.turns for t in scored) / n,
        "mean_tokens": policy_tokens / n,  # the policy's tokens per episode
        "episode_tokens": sum(len(t.token_ids) for t in scored) / n,  # the whole conversation's
        "policy_tokens": float(policy_tokens),
        "truncated": sum(t.truncated is not None for t in scored) / n,
        "cut_turns": float(sum(t.cut_turns for t in scored)),
        "infra_errors": len(trajs) - len(scored),
        "tokens_per_s": policy_tokens / max(generate_s, 1e-9),
        "generate_s": generate_s,
        "env_s": env_s,
        "seconds": generate_s + env_s,
    }


def episode_records(trajs) -> list[dict]:
    """One record per played episode (the eval files' `records`)."""
    return [{"task": t.task, "won": t.won, "return": t.episode_return, "turns": t.turns,
             "policy_tokens": t.num_policy_tokens, "truncated": t.truncated, "infra_error": t.infra_error,
             "end": t.end, **({"episode_stats": t.episode_stats} if t.episode_stats else {}),
             "transcript": t.transcript}
            for t in trajs]


def evaluate_episodes(model, tokenizer, env_name: str, env_options: dict, tasks: list[dict], cfg: EvalConfig,
                      rollout_cfg, max_episode_tokens: int) -> tuple[dict, list[dict]]:
    """Play each task once, greedy (eval.temperature), in this process; multi-turn envs."""
    if not tasks:
        raise ValueError("no tasks to evaluate")
    engine = engine_for(model, tokenizer, cfg)
    runner = EpisodeRunner.for_env(engine, tokenizer, env_name, env_options, rollout_cfg, max_episode_tokens)
    try:
        trajs, stats = runner.play(tasks, 1, seed=0, temperature=cfg.temperature)
    finally:
        runner.close()
    records = episode_records(trajs)
    return {**summarize(trajs, stats.as_dict()), **env_eval_stats(env_name, records)}, records


def print_summary(title: str, rows: dict[str, dict]) -> None:
    """A rich table: one row per evaluated split/file."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    turns = any("mean_turns" in s for s in rows.values())
    sampled = all("sampled_accuracy" in s for s in rows.values())
    cols = ["split", "tasks", "accuracy"] + (["sampled"] if sampled else []) + (["mean turns"] if turns else []) + [
        "mean tokens", "truncated", "tokens/s", "seconds"]
    for col in cols:
        table.add_column(col, justify="left" if col == "split" else "right", no_wrap=True)
    for name, s in rows.items():
        table.add_row(name, str(s["tasks"]), f"{s['accuracy']:.1%}",
                      *([f"{s['sampled_accuracy']:.1%}"] if sampled else []),
                      *([f"{s.get('mean_turns', 1):.1f}"] if turns else []), f"{s['mean_tokens']:.0f}",
                      f"{s['truncated']:.1%}", f"{s['tokens_per_s']:.0f}", f"{s['seconds']:.1f}")
    console = Console()
    console.width = max(console.width, 120)  # a pipe or CI log reports 80 columns: keep rows whole
    console.print(table)
    groups = breakdown(rows)
    if groups:  # an env's eval_stats broke success down (`success/<group>`, `tasks/<group>`)
        table = Table(title=f"{title}: success per group")
        for col in ("split", "group", "tasks", "success"):
            table.add_column(col, justify="left" if col in ("split", "group") else "right", no_wrap=True)
        for name, group, tasks, success in groups:
            table.add_row(name, group, "" if tasks is None else str(tasks), f"{success:.1%}")
        console.print(table)
    for name, stat, parts in shares(rows):  # e.g. SWE's tool-call mix
        console.print(f"{name} {stat}: " + ", ".join(f"{part} {value:.0%}" for part, value in parts))


def shares(rows: dict[str, dict]) -> list[tuple[str, str, list[tuple[str, float]]]]:
    """(split, stat, [(part, share)]) for the `<stat>_share/<part>` keys an env's eval_stats adds
    (SWE: tool_share/<tool>, the tool-call mix), largest share first."""
    out = []
    for name, s in rows.items():
        found: dict[str, list[tuple[str, float]]] = {}
        for key, value in s.items():
            head, _, part = key.partition("/")
            if head.endswith("_share") and part and isinstance(value, (int, float)):
                found.setdefault(head[: -len("_share")], []).append((part, float(value)))
        out += [(name, stat, sorted(parts, key=lambda p: -p[1])) for stat, parts in found.items()]
    return out


def breakdown(rows: dict[str, dict]) -> list[tuple[str, str, int | None, float]]:
    """(split, group, tasks, success) for every `success/<group>` key of each row's summary, in the
    summary's order: the per-group table print_summary adds (e.g. ALFWorld's task types)."""
    return [(name, key.split("/", 1)[1], s.get(f"tasks/{key.split('/', 1)[1]}"), float(value))
            for name, s in rows.items() for key, value in s.items()
            if key.startswith("success/") and isinstance(value, (int, float))]


def save_eval(path: Path, summary: dict, records: list[dict], meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**meta, "summary": summary, "records": records}, indent=1))
