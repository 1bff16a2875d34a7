"""The benchmark scripts still run and print their tables (smoke runs on the tiny models; the
numbers themselves live in docs/, never asserted here)."""
import json
import subprocess
import sys

import pytest
from conftest import REPO


def _run(*args: str) -> str:
    out = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_rollout_bench_prints_every_backend_row():
    out = _run("bench/rollout.py", "--quick", "--models", "tiny-1M", "--multi-model", "tiny-1M", "--no-vllm",
               "--threads", "1")
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 7 and cells[0].startswith("tiny-1M"):
            rows[(cells[1], cells[2])] = float(cells[5])  # tokens/s
    single, multi = "8x16", "2 turns x 8x8 (+24 obs)"
    assert set(rows) == {(single, "transformers generate"), (single, "TorchEngine"), (multi, "transformers generate"),
                         (multi, "TorchEngine"), (multi, "TorchEngine + sessions")}, out
    assert all(tps > 0 for tps in rows.values())


def test_learner_bench_writes_its_rows(tmp_path):
    path = tmp_path / "rows.json"
    _run("bench/learner.py", "--quick", "--models", "tiny-h128-L4", "--frameworks", "turnstile",
         "turnstile-compiled", "--threads", "1", "--json", str(path))
    report = json.loads(path.read_text())
    assert [(r["model"], r["framework"]) for r in report["rows"]] == [("tiny-h128-L4", "turnstile"),
                                                                      ("tiny-h128-L4", "turnstile-compiled")]
    for row, compiled in zip(report["rows"], (False, True)):
        assert row["tokens"] == 2 * 4 * (16 + 32) and row["tps"] > 0 and 0 < row["pct"] < 150, row
        assert row["detail"]["compiled"] is compiled  # the row ran Turnstile's learner, compiled or not
    assert report["peak_gflops"]["fp32"] > 0


@pytest.fixture(scope="module")
def iteration_report(tmp_path_factory):
    """One quick run of bench/iteration.py (a fresh policy, 2 tasks x 2 episodes of 3 turns, one timed
    iteration per row): the Turnstile row always, the TRL row when trl is installed."""
    import importlib.util

    path = tmp_path_factory.mktemp("iteration") / "rows.json"
    rows = ["turnstile"] + (["trl"] if importlib.util.find_spec("trl") else [])
    out = _run("bench/iteration.py", "--quick", "--threads", "1", "--rows", *rows, "--out", str(path))
    return out, json.loads(path.read_text())


def _check_iteration_row(row: dict) -> None:
    assert row["episodes"] == 2 * 2 and row["policy_tokens"] > 0 and row["iteration_s"] > 0, row
    phases = sum(row[k] for k in ("generate_s", "env_s", "update_s", "sync_s", "other_s"))
    assert phases == pytest.approx(row["iteration_s"], rel=1e-6, abs=1e-6), row
    assert row["generate_s"] > 0 and row["update_s"] > 0 and row["cpu_s"] > 0 and len(row["detail"]["rounds"]) == 1


def test_iteration_bench_turnstile_row(iteration_report):
    out, report = iteration_report
    row = report["rows"][0]
    assert (row["row"], row["workers"], row["ranks"]) == ("turnstile", 1, 1), row
    _check_iteration_row(row)
    assert row["sync_s"] > 0 and row["detail"]["rounds"][0]["old_pass"] == 0.0  # on-policy: no pi_old pass
    header = next(line for line in out.splitlines() if line.startswith("| run"))
    assert [c.strip() for c in header.strip("|").split("|")][3:9] == ["s/iter", "generation", "env", "update", "sync",
                                                                        "other"]
    assert report["cpu"] and len(report["loadavg_before"]) == 3


def test_iteration_bench_trl_row(iteration_report):
    pytest.importorskip("trl")
    out, report = iteration_report
    trl = next(r for r in report["rows"] if r["row"] == "trl")
    _check_iteration_row(trl)
    assert trl["sync_s"] == 0.0 and not trl["detail"]["gradient_checkpointing"], trl
    assert "Turnstile vs TRL:" in out and any(line.startswith("| TRL ") for line in out.splitlines())


def test_backbones_bench_runs_derived_archs_and_resumes(tmp_path):
    """bench/backbones.py on a shrunken main job: dense, then factor (converted from it) and ones
    (distilled from moe); each row has before/after success and parameter counts, and a second
    call reads finished archs back instead of training them again."""
    out = tmp_path / "bb"
    shrink = ["model.hidden_size=32", "model.num_heads=1", "sft.steps=4", "sft.log_every=2", "sft.save_every=4",
              "sft.demos.num_examples=64", "eval.num_tasks=4", "rl.iterations=1", "rl.tasks_per_iter=2",
              "rl.group_size=2", "rl.minibatch_size=4", "rl.micro_batch_size=4", "rl.eval_samples=0",
              "rl.save_every=1", "runtime.threads=1", "rollout.num_workers=0", f"data_dir={tmp_path / 'data'}"]
    args = ["bench/backbones.py", "--out", str(out), "--convert-steps", "2", "--distill-steps", "2", "--set", *shrink]
    text = _run(*args, "--archs", "llama", "factor", "moe", "ones")
    rows = json.loads((out / "backbones.json").read_text())
    assert list(rows) == ["llama", "factor", "moe", "ones"]
    for arch, row in rows.items():
        assert row["tasks"] == 4 and 0 <= row["after_greedy"] <= 1 and row["params"] > 0, (arch, row)
    assert rows["factor"]["active_params"] < rows["factor"]["params"]  # top-4 of 8 slice experts
    assert rows["moe"]["active_params"] < rows["moe"]["params"]
    # the student is the dense shape, plus the attention biases it keeps from Qwen2-MoE (4 layers x q/k/v/o x 32)
    assert rows["ones"]["params"] - rows["llama"]["params"] == 4 * 4 * 32
    assert "| ones |" in text
    before = (out / "llama" / "metrics.jsonl").read_text()
    _run(*args, "--archs", "llama")  # finished: resumed, nothing trained again
    assert (out / "llama" / "metrics.jsonl").read_text() == before


def test_numerics_bench_fingerprints_a_seeded_run_identically_on_rerun(tmp_path):
    """On one machine the seeded main job is reproducible to the bit: a rerun into a new folder prints
    the same success and the same weight fingerprints (across CPUs it need not: docs/countdown.md)."""
    tiny = ["--set", "sft.steps=10", "sft.save_every=10", "sft.demos.num_examples=100", "eval.num_tasks=4",
            "rl.eval_tasks=4", "rl.tasks_per_iter=2", "rl.group_size=2", "rl.minibatch_size=4", "rl.micro_batch_size=4",
            "eval.max_new_tokens=100", "rl.iterations=1", "rl.save_every=1", "env.heldout_size=8", "env.valid_size=4",
            f"data_dir={tmp_path / 'data'}"]

    def table(out):
        text = _run("bench/numerics.py", "--precisions", "fp32", "--out", str(out), *tiny)
        assert "machine: " in text
        return [line for line in text.splitlines() if line.startswith("| fp32 |")]

    first = table(tmp_path / "a")
    assert len(first) == 1 and len(first[0].split("|")[7].strip()) == 12  # a 12-digit fingerprint
    assert table(tmp_path / "b") == first
