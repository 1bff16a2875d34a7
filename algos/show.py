"""`launch.py show RESULTS`: the conversations of evaluated episodes, printed readably.

    python launch.py show runs/textworld_w2o3q4_ppo                    # the run's newest eval file
    python launch.py show runs/x/eval/heldout_rl.json --failed         # only the episodes not won
    python launch.py show runs/x/eval/heldout_rl.json --task 17        # one episode: index or task id

RESULTS is an eval file (`eval/<split>.json` from `launch.py eval`, `<split>_before_rl.json`,
`valid_<iteration>.json` and `<split>_rl.json` from RL's evaluations) or a run folder (its newest
eval file). Each multi-turn record carries its `transcript` (rollout/trajectory.py): the env's
first observation, then per turn the action as decoded, its reward and the env's reply, and `end`,
why the episode stopped. Single-turn records (Countdown's one-shot streams) print their completion.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# task fields that name a task, most specific first (any env: ids, instance ids, game files)
ID_KEYS = ("instance_id", "id", "task_id", "game", "game_file", "name")


def results_file(path: str | Path) -> Path:
    """The eval file itself, or a run folder's newest one (ValueError naming the path if none)."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        files = sorted((path / "eval").glob("*.json"), key=lambda p: p.stat().st_mtime) if (path / "eval").is_dir() else []
        if files:
            return files[-1]
        raise ValueError(f"{path}: no eval/*.json in this run folder (launch.py eval or an RL run writes them)")
    raise ValueError(f"{path}: no such eval file or run folder")


def task_label(task: Any) -> str:
    """A short name for a record's task: its id-like field, else its scalar fields."""
    if not isinstance(task, dict):
        return str(task)
    for key in ID_KEYS:
        if key in task and isinstance(task[key], (str, int)):
            return str(task[key])
    scalars = {k: v for k, v in task.items() if isinstance(v, (str, int, float)) and len(str(v)) <= 40}
    return json.dumps(scalars, sort_keys=True)[:120] if scalars else "?"


def matches(index: int, record: dict, wanted: str) -> bool:
    """--task: the record's index, its task label or any of its task's scalar values."""
    task = record.get("task")
    values = [str(v) for v in task.values() if isinstance(v, (str, int, float))] if isinstance(task, dict) else []
    return wanted in (str(index), task_label(task), *values)


def select(records: list[dict], failed: bool = False, task: str | None = None) -> list[tuple[int, dict]]:
    out = [(i, r) for i, r in enumerate(records)]
    if failed:
        out = [(i, r) for i, r in out if not r.get("won")]
    if task is not None:
        out = [(i, r) for i, r in out if matches(i, r, task)]
    return out


def _clip(text: str, limit: int) -> str:
    text = str(text).rstrip()
    if limit and len(text) > limit:
        half = limit // 2
        return f"{text[:half]}\n… ({len(text) - 2 * half} characters left out) …\n{text[-half:]}"
    return text


def render(index: int, record: dict, console, max_chars: int = 2000) -> None:
    from rich.panel import Panel
    from rich.text import Text

    won = bool(record.get("won"))
    ret = record.get("return", record.get("reward"))
    head = f"#{index}  task {task_label(record.get('task'))}  {'WON' if won else 'not won'}"
    if ret is not None:
        head += f"  return {float(ret):.3f}"
    if "turns" in record:
        head += f"  turns {record['turns']}"
    body = Text()
    transcript = record.get("transcript")
    if transcript:
        for k, turn in enumerate(transcript):
            if "action" in turn:
                body.append(f"\n[turn {k}] ", style="bold")
                body.append(f"reward {turn.get('reward', 0.0):+.3f}\n", style="yellow")
                body.append(_clip(turn["action"], max_chars) + "\n", style="bold cyan")
            for key, style in (("observation", "dim"), ("error", "red"), ("cut", "red")):
                if key in turn:
                    label = "" if key == "observation" else f"({key}) "
                    body.append(label + _clip(turn[key], max_chars) + "\n", style=style)
    elif "completion" in record:  # single-turn: the prompt is the task, the completion the answer
        body.append(_clip(record["completion"], max_chars) + "\n", style="bold cyan")
    else:
        body.append("(no transcript in this record: an eval file from before transcripts were saved)\n", style="dim")
    end = record.get("end") or record.get("reason") or record.get("finish_reason")
    if end:
        body.append(f"ended: {end}", style="green" if won else "magenta")
    console.print(Panel(body, title=head, title_align="left", border_style="green" if won else "red"))


def show(results: str | Path, failed: bool = False, task: str | None = None, limit: int | None = None,
         max_chars: int = 2000, console=None) -> int:
    """Print the selected episodes of an eval file (or a run folder's newest); returns how many."""
    from rich.console import Console

    path = results_file(results)
    data = json.loads(path.read_text())
    records = data.get("records")
    if not isinstance(records, list):
        raise ValueError(f"{path}: not an eval file (no 'records' list)")
    chosen = select(records, failed, task)
    console = console or Console()
    summary = data.get("summary", {})
    console.print(f"{path}: {len(records)} episodes, success {summary.get('accuracy', 0):.1%}; "
                  f"showing {min(len(chosen), limit or len(chosen))}"
                  + (" not won" if failed else "") + (f" matching task {task!r}" if task is not None else ""))
    if task is not None and not chosen:
        raise ValueError(f"{path}: no episode matches --task {task!r} (an index 0..{len(records) - 1}, "
                         f"or a task id such as {task_label(records[0].get('task')) if records else '?'!r})")
    for index, record in chosen[:limit]:
        render(index, record, console, max_chars)
    return len(chosen[:limit])
