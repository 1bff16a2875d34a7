"""Config loading: every wrong key or value fails before work starts, naming key and origin."""
from pathlib import Path

import pytest
import torch
from conftest import REPO

from algos.config import ConfigError, load_config


def test_tiny_recipe_loads_with_defaults(tiny_recipe):
    exp = load_config(tiny_recipe)
    assert exp.name == "tiny" and exp.env.name == "countdown"
    assert exp.env_options()["num_inputs"] == 3
    assert exp.sft.betas == (0.9, 0.95)  # default filled in


@pytest.mark.parametrize("recipe", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_is_valid(recipe):
    load_config(recipe)


def test_unknown_key_names_key_file_and_closest_valid_key(tiny_recipe):
    tiny_recipe.write_text(tiny_recipe.read_text().replace("  lr: 3.0e-3", "  lrr: 3.0e-3"))
    with pytest.raises(ConfigError) as e:
        load_config(tiny_recipe)
    msg = str(e.value)
    assert "unknown key 'sft.lrr'" in msg and str(tiny_recipe) in msg and "did you mean 'sft.lr'" in msg


def test_unknown_env_key_is_checked_by_the_env_schema(tiny_recipe):
    with pytest.raises(ConfigError, match=r"unknown key 'env.num_input' .*did you mean 'env.num_inputs'"):
        load_config(tiny_recipe, ["+env.num_input=4"])


def test_wrong_type_names_key_and_value(tiny_recipe):
    with pytest.raises(ConfigError, match=r"bad value for 'model.hidden_size' \(command-line override\).*'wide'"):
        load_config(tiny_recipe, ["model.hidden_size=wide"])


def test_impossible_values_fail(tiny_recipe, monkeypatch):
    with pytest.raises(ConfigError, match=r"sft.lr.*greater than 0"):
        load_config(tiny_recipe, ["sft.lr=-1"])
    with pytest.raises(ConfigError, match=r"min_number \(50\) must be <= max_number \(20\)"):
        load_config(tiny_recipe, ["env.min_number=50"])
    with pytest.raises(ConfigError, match=r"head size .* 16 is not one vLLM can serve"):
        load_config(tiny_recipe, ["model.num_heads=4"])
    # Constrained decoding needs an env that lists its actions, and a backend that can mask: the torch
    # engine, or a vLLM with per-request logits processors (0.11 or newer)
    with pytest.raises(ConfigError, match=r"'rollout.constrain_actions' \(command-line override\).*env 'countdown'"):
        load_config(tiny_recipe, ["rollout.constrain_actions=true"])
    exp = load_config("configs/textworld_w2o3q4_ppo.yaml", ["rollout.constrain_actions=true"])
    assert exp.rollout.constrain_actions
    import importlib.metadata

    def installed(version):
        def lookup(dist):
            if dist != "vllm":
                raise importlib.metadata.PackageNotFoundError(dist)
            return version
        return lookup

    vllm_constrained = ["rollout.constrain_actions=true", "rollout.backend=vllm"]
    with monkeypatch.context() as m:
        m.setattr(importlib.metadata, "version", installed("0.10.1"))
        with pytest.raises(ConfigError, match=r"needs vLLM >= 0.11 \(per-request logits processors\); vLLM 0.10.1"):
            load_config("configs/textworld_w2o3q4_ppo.yaml", vllm_constrained)
        m.setattr(importlib.metadata, "version", installed("0.32.0"))
        assert load_config("configs/textworld_w2o3q4_ppo.yaml", vllm_constrained).rollout.backend == "vllm"


def test_rollout_placement_defaults_and_refuses_a_gpu_worker_without_a_gpu(tiny_recipe, monkeypatch):
    import torch

    from rollout.worker import engine_placement

    with pytest.raises(ConfigError, match=r"rollout.device=cuda needs rollout.gpus_per_worker > 0"):
        load_config(tiny_recipe, ["rollout.device=cuda", "rollout.num_workers=2"])
    with pytest.raises(ConfigError, match=r"bad value for 'rollout.dtype'.*'fp32'"):
        load_config(tiny_recipe, ["rollout.dtype=fp32"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert engine_placement(load_config(tiny_recipe).rollout) == ("cpu", "float32")
    assert engine_placement(load_config(tiny_recipe, ["rollout.dtype=bfloat16"]).rollout) == ("cpu", "bfloat16")
    gpu_worker = load_config(tiny_recipe, ["rollout.device=cuda", "rollout.gpus_per_worker=1"]).rollout
    with pytest.raises(RuntimeError, match="rollout.device=cuda but this rollout worker sees no GPU"):
        engine_placement(gpu_worker)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # what a worker holding a GPU sees
    assert engine_placement(load_config(tiny_recipe).rollout) == ("cuda", "bfloat16")
    assert engine_placement(gpu_worker) == ("cuda", "bfloat16")


def test_rollout_dtype_auto_is_bf16_on_a_native_bf16_cpu_when_the_recipe_trains_in_bf16(tiny_recipe, monkeypatch):
    """dtype auto on a CPU: bf16 only where the CPU computes it natively, the recipe's precision is a
    bf16 one (or auto) and the policy is 512 wide or more; an fp32 recipe keeps exact fp32 rollouts, an
    emulating CPU never gets bf16."""
    import torch

    import rollout.worker
    from rollout.worker import engine_placement

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = load_config(tiny_recipe).rollout
    for native in (True, False):
        monkeypatch.setattr(rollout.worker, "native_bf16", lambda device, n=native: n)
        for precision in ("auto", "amp_bf16", "bf16", "fp32", "amp_fp16"):
            want = "bfloat16" if native and precision in ("auto", "amp_bf16", "bf16") else "float32"
            assert engine_placement(cfg, precision, hidden_size=512) == ("cpu", want), (native, precision)
            # a narrow policy decodes faster in fp32 whatever the CPU
            assert engine_placement(cfg, precision, hidden_size=128) == ("cpu", "float32"), (native, precision)
    # an explicit dtype is kept whatever the CPU
    monkeypatch.setattr(rollout.worker, "native_bf16", lambda device: True)
    assert engine_placement(load_config(tiny_recipe, ["rollout.dtype=float32"]).rollout, "amp_bf16", 512) == ("cpu", "float32")
    assert engine_placement(load_config(tiny_recipe, ["rollout.dtype=bfloat16"]).rollout, "fp32", 64) == ("cpu", "bfloat16")


def test_machine_name_names_the_cpu_model_and_its_matrix_extensions(monkeypatch, tmp_path):
    import builtins

    from rollout import machine

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu avx2 avx512f amx_bf16\n\n"
                       "processor\t: 1\nmodel name\t: other\n")
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: real_open(cpuinfo if f == "/proc/cpuinfo" else f, *a, **k))
    monkeypatch.setattr(machine, "free_cores", lambda: 3)
    assert machine.cpu_model() == ("Test CPU 9000", ["amx_bf16", "avx512f", "avx2"])
    name = machine.machine_name()
    assert name.startswith("Test CPU 9000 (amx_bf16, avx512f, avx2), 3 cores")

def test_unknown_env_name_suggests(tiny_recipe):
    with pytest.raises(ConfigError, match=r"unknown env.name 'countdwn'.*did you mean 'countdown'"):
        load_config(tiny_recipe, ["env.name=countdwn"])


def test_bad_override_syntax_and_missing_file(tiny_recipe, tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(tiny_recipe, ["sft.steps"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_yaml_syntax_error_names_file(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: cannot parse YAML"):
        load_config(bad)


def test_base_recipes_are_overlaid_and_named_after_their_own_file(tmp_path):
    (tmp_path / "parent.yaml").write_text("name: parent\nenv: {name: countdown, num_inputs: 3}\nsft: {steps: 7}\n")
    (tmp_path / "child.yaml").write_text("base: parent.yaml\nsft: {lr: 0.01}\n")
    exp = load_config(tmp_path / "child.yaml")
    assert (exp.name, exp.sft.steps, exp.sft.lr, exp.env_options()["num_inputs"]) == ("child", 7, 0.01, 3)
    assert exp.out_dir == "runs/child"
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "orphan.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"missing.yaml \(the base of .*orphan.yaml\)"):
        load_config(tmp_path / "orphan.yaml")


def test_optimal_baseline_differs_from_sos_only_in_demo_format():
    sos, opt = load_config(REPO / "configs/countdown4_sos.yaml"), load_config(REPO / "configs/countdown4_optimal.yaml")
    assert opt.name == "countdown4_optimal" and opt.sft.demos.format == "optimal"
    a, b = sos.model_dump(exclude={"name", "out_dir"}), opt.model_dump(exclude={"name", "out_dir"})
    a["sft"]["demos"].pop("format"), b["sft"]["demos"].pop("format")
    assert a == b


def test_demo_options_are_checked_by_the_envs_own_schema(tiny_recipe):
    with pytest.raises(ConfigError, match=r"unknown key 'sft.demos.beams' \(command-line override\)"
                                          r".*Valid keys here: num_examples, mistakes$"):
        load_config(REPO / "configs/textworld_w2o3q4_ppo.yaml", ["sft.demos.beams=[1]"])
    tiny_recipe.write_text(tiny_recipe.read_text().replace("    strategies: [dfs]", "    strategy: [dfs]"))
    with pytest.raises(ConfigError, match=r"unknown key 'sft.demos.strategy' \(in .*tiny.yaml\); "
                                          r"did you mean 'sft.demos.strategies'"):
        load_config(tiny_recipe)
    with pytest.raises(ConfigError, match=r"bad value for 'sft.demos.format' \(command-line override\)"):
        load_config(REPO / "configs/countdown3_sos.yaml", ["sft.demos.format=greedy"])


def test_demo_options_at_their_default_share_the_data_cache(tiny_recipe):
    from algos.data import data_folder

    plain = data_folder(load_config(tiny_recipe))
    assert data_folder(load_config(tiny_recipe, ["sft.demos.beams=[1,2,3,4,5]"])) == plain  # the env's default
    assert data_folder(load_config(tiny_recipe, ["sft.demos.beams=[1]"])) != plain


def test_precision_auto_is_amp_bf16_only_where_bf16_is_native(monkeypatch):
    """runtime.precision=auto resolves per process: amp_bf16 on a CPU with AVX512-BF16/AMX, fp32 on one
    that would emulate bf16 (~10x slower); an explicit amp_bf16 on such a CPU is kept, with a warning."""
    from algos import runtime
    from algos.config import RuntimeConfig

    for native, expected in ((True, "amp_bf16"), (False, "fp32")):
        monkeypatch.setattr(runtime, "native_bf16", lambda device, n=native: n)
        cfg = RuntimeConfig(device="cpu", precision="auto")
        assert runtime.resolve_runtime(cfg).type == "cpu"
        assert cfg.precision == expected
        assert runtime.param_dtype(cfg.precision) is torch.float32  # amp keeps fp32 weights
    cfg = RuntimeConfig(device="cpu", precision="amp_bf16")
    with pytest.warns(UserWarning, match="runtime.precision=amp_bf16"):
        runtime.resolve_runtime(cfg)
    assert cfg.precision == "amp_bf16"
    # what this machine reports is one of the two, and a recipe left at auto resolves to a real precision
    cfg = load_config("configs/countdown3_sos.yaml").runtime
    runtime.resolve_runtime(cfg)
    assert cfg.precision in ("amp_bf16", "fp32")


def test_threads_default_to_the_free_cores_and_busy_cores_are_warned(monkeypatch, tmp_path):
    """runtime.threads=None sets torch to the cores this process may use (its affinity, capped by a
    cgroup quota), not the host's; a load average that says other jobs keep cores busy is warned
    about, naming the threads to set; this process's own load is not counted as contention."""
    import os
    import warnings

    from algos import runtime
    from algos.config import RuntimeConfig

    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})  # e.g. under taskset -c 0
        monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.1, 0.1))
        monkeypatch.setattr(runtime, "own_cpu_rate", lambda: 0.0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # an idle machine: no notice
            assert runtime.apply_threads(RuntimeConfig()) == 1
        assert torch.get_num_threads() == 1
        with pytest.warns(UserWarning, match=r"2 torch threads on the 1 cores .* runtime\.threads=1"):
            assert runtime.apply_threads(RuntimeConfig(threads=2)) == 2  # an explicit count wins, with a notice
        assert torch.get_num_threads() == 2

        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
        monkeypatch.setattr(os, "getloadavg", lambda: (1.1, 1.0, 0.5))  # another job keeps a core busy
        with pytest.warns(UserWarning, match=r"load average is 1\.1 .* runtime\.threads=1"):
            assert runtime.apply_threads(RuntimeConfig()) == 2
        assert runtime.busy_cores_notice(threads=1, cores=2) is None  # one thread fits beside it
        monkeypatch.setattr(runtime, "own_cpu_rate", lambda: 1.0)  # the load is this process's own
        assert runtime.busy_cores_notice(threads=2, cores=2) is None
    finally:
        torch.set_num_threads(before)


def test_free_cores_reads_a_cgroup_cpu_quota(monkeypatch, tmp_path):
    """A container given 1.5 CPUs on an 8-core host gets 2 threads, not 8."""
    import builtins
    import os

    from algos import runtime

    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: real_open(quota if f == "/sys/fs/cgroup/cpu.max" else f,
                                                                       *a, **k))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert runtime.free_cores() == 2
    quota.write_text("max 100000\n")
    assert runtime.free_cores() == 8
