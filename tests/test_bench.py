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
    _run("bench/learner.py", "--quick", "--models", "tiny-h128-L4", "--frameworks", "turnstile", "--threads", "1",
         "--json", str(path))
    report = json.loads(path.read_text())
    assert [(r["model"], r["framework"]) for r in report["rows"]] == [("tiny-h128-L4", "turnstile")]
    row = report["rows"][0]
    assert row["tokens"] == 2 * 4 * (16 + 32) and row["tps"] > 0 and 0 < row["pct"] < 150, row
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
