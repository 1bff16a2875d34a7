"""The command line end to end on a tiny recipe, its error messages, and the README/CI contract."""
import json
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO

import launch
from algos.malloc import mimalloc_env


def test_gen_data_sft_eval_end_to_end(tiny_recipe, tmp_path, capsys):
    assert launch.main(["gen-data", str(tiny_recipe)]) == 0
    assert "problems_per_s" in capsys.readouterr().out
    assert launch.main(["sft", str(tiny_recipe)]) == 0
    out = capsys.readouterr().out
    assert "heldout_unseen" in out and "accuracy" in out
    result = json.loads((tmp_path / "run" / "eval" / "heldout_unseen.json").read_text())
    assert result["summary"]["tasks"] == 8 and len(result["records"]) == 8
    assert 0.0 <= result["summary"]["accuracy"] <= 1.0 and result["summary"]["tokens_per_s"] > 0
    assert (tmp_path / "run" / "tb").is_dir() and (tmp_path / "run" / "metrics.jsonl").exists()

    # a user's own problems file, evaluated with the run's checkpoint
    problems = tmp_path / "mine.jsonl"
    problems.write_text('{"numbers": [3, 4, 5], "target": 27}\n{"numbers": [2, 9, 9], "target": 11}\n')
    assert launch.main(["eval", str(tiny_recipe), "--checkpoint", str(tmp_path / "run"),
                        "--problems-file", str(problems), "eval.max_new_tokens=5"]) == 0  # overrides after options
    mine = json.loads((tmp_path / "run" / "eval" / "mine.json").read_text())
    assert mine["summary"]["mean_tokens"] <= 5
    assert [r["task"]["target"] for r in mine["records"]] == [27, 11]


def test_bad_inputs_give_one_clear_line(tiny_recipe, tmp_path, capsys):
    assert launch.main(["eval", str(tiny_recipe), "--checkpoint", str(tmp_path)]) == 2
    assert "holds no model" in capsys.readouterr().err
    assert launch.main(["sft", str(tiny_recipe), "sft.stepz=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown key 'sft.stepz' (command-line override); did you mean 'sft.steps'?")
    assert "Traceback" not in err


def test_malformed_problem_file_names_file_and_line(tiny_recipe, tmp_path, capsys):
    assert launch.main(["sft", str(tiny_recipe), "sft.steps=1"]) == 0
    capsys.readouterr()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"numbers": [3, 4, 5], "target": 27}\n{"numbers": [3, 4], "target": 7}\n')
    args = ["eval", str(tiny_recipe), "--checkpoint", str(tmp_path / "run"), "--problems-file", str(bad)]
    assert launch.main(args) == 2
    assert re.search(r"bad\.jsonl:2: .*3", capsys.readouterr().err)


def _readme_commands():
    text = (REPO / "README.md").read_text()
    block = re.search(r"```(?:bash|sh)\n(.*?)```", text, re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    commands = _readme_commands()
    assert len(commands) == 2, commands
    main_job, tests = commands
    assert "pip install" in main_job and "launch.py" in main_job
    assert "pip install" in tests and "pytest" in tests
    ci = (REPO / ".ci" / "run").read_text()
    assert tests in ci, "CI must run the README's test command verbatim"


def test_cli_help_lists_the_subcommands():
    out = subprocess.run([sys.executable, str(REPO / "launch.py"), "--help"], capture_output=True, text=True,
                         cwd=REPO, check=True).stdout
    for sub in ("gen-data", "sft", "train", "eval"):
        assert sub in out


@pytest.mark.skipif(mimalloc_env({}) is None, reason="cmeel-mimalloc is not installed (Linux x86-64 only)")
def test_command_line_reruns_itself_with_mimalloc_and_torch_trains_under_it():
    env = mimalloc_env({"PATH": "/usr/bin:/bin"})
    assert env["LD_PRELOAD"].endswith("libmimalloc.so")
    assert mimalloc_env(env) is None  # the re-run does not loop
    assert mimalloc_env({"TURNSTILE_MALLOC": "system"}) is None
    assert mimalloc_env({"LD_PRELOAD": "/x/libfoo.so"})["LD_PRELOAD"].endswith(":/x/libfoo.so")
    assert mimalloc_env({"LD_PRELOAD": "/usr/lib/libtcmalloc_minimal.so.4"}) is None  # the user's own
    # the re-run has the library mapped, and torch trains under it
    code = ("import sys, torch; sys.path.insert(0, '.'); from algos.malloc import rerun_with_mimalloc\n"
            "rerun_with_mimalloc()\n"
            "m = torch.nn.Linear(64, 64); m(torch.randn(8, 64)).sum().backward()\n"
            "print('mapped' if 'libmimalloc' in open('/proc/self/maps').read() else 'missing', m.weight.grad.shape)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True,
                         env={k: v for k, v in os.environ.items() if k != "LD_PRELOAD"})
    assert out.stdout.split() == ["mapped", "torch.Size([64,", "64])"], out.stdout + out.stderr


def test_train_refuses_to_extend_a_finished_sft_run(tiny_recipe, tmp_path, capsys):
    # A finished 2-step SFT run is someone's policy: a recipe asking for 3 SFT steps in the same
    # folder must not resume (and silently retrain) it.
    assert launch.main(["sft", str(tiny_recipe), "sft.steps=2"]) == 0
    latest = (tmp_path / "run" / "checkpoints" / "latest").read_text()
    capsys.readouterr()
    rl = ["rl.algo=grpo", f"rl.init_from={tmp_path / 'run'}", f"out_dir={tmp_path / 'rl'}"]
    assert launch.main(["train", str(tiny_recipe), "sft.steps=3", *rl]) == 2
    err = capsys.readouterr().err
    assert "holds a finished SFT run of 2 steps" in err and "sft.steps=3" in err
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == latest
