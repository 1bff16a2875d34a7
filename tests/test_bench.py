"""The benchmark scripts still run and print their tables (smoke runs on the tiny models; the
numbers themselves live in docs/, never asserted here)."""
import json
import subprocess
import sys

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
