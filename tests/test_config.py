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


def test_impossible_values_fail(tiny_recipe):
    with pytest.raises(ConfigError, match=r"sft.lr.*greater than 0"):
        load_config(tiny_recipe, ["sft.lr=-1"])
    with pytest.raises(ConfigError, match=r"min_number \(50\) must be <= max_number \(20\)"):
        load_config(tiny_recipe, ["env.min_number=50"])
    with pytest.raises(ConfigError, match=r"head size .* 16 is not one vLLM can serve"):
        load_config(tiny_recipe, ["model.num_heads=4"])
    # Constrained decoding needs an env that lists its actions, and the torch engine.
    with pytest.raises(ConfigError, match=r"'rollout.constrain_actions' \(command-line override\).*env 'countdown'"):
        load_config(tiny_recipe, ["rollout.constrain_actions=true"])
    with pytest.raises(ConfigError, match=r"rollout.constrain_actions needs rollout.backend=torch"):
        load_config("configs/textworld_w2o3q4_ppo.yaml", ["rollout.constrain_actions=true", "rollout.backend=vllm"])
    exp = load_config("configs/textworld_w2o3q4_ppo.yaml", ["rollout.constrain_actions=true"])
    assert exp.rollout.constrain_actions


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
