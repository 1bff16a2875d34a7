"""OneS (agents/ones.py, algos/distill.py): gathering a `moe` policy's experts into a dense Llama
student — exact where the gates are constant, a loadable llama folder for every method, the
student in the embedded engine — then distillation against the mixture, `launch.py distill` end
to end, and its named errors."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_RECIPE
from rl_helpers import tiny_tokenizer

import launch
from agents.model import ModelConfig, build_model, load_pretrained
from agents.ones import GatherError, calibration_inputs, gate_stats, gather_dense, gathered_width
from algos.checkpoint import policy_folder
from rollout.decoders import LlamaDecoder
from rollout.engine import SamplingParams, TorchEngine

VOCAB = 300


def moe_model(seed: int = 0, vocab: int = VOCAB, **kw):
    """hidden 64, 2 layers, E = 4 experts of width 64, a shared expert of 128; k = 2."""
    torch.manual_seed(seed)
    cfg = ModelConfig(**{"arch": "moe", "hidden_size": 64, "num_layers": 2, "num_heads": 2, "num_experts": 4,
                         "top_k": 2, "max_seq_len": 256, **kw})
    return build_model(cfg, vocab, 0, 1, 2).eval()


@torch.no_grad()
def _scale_up(model, std: float = 0.3):
    """Experts and routers large enough that the FFN, and which experts a token takes, matter."""
    for layer in model.model.layers:
        for p in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj, layer.mlp.gate.weight):
            p.normal_(0, std)
    return model


def _batch(seed: int = 0, n: int = 4, length: int = 40):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0  # a padded row: calibration counts its real tokens only
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def _max_logit_gap(a, b, batch) -> float:
    real = batch["attention_mask"].bool()
    return float((a(**batch).logits - b(**batch).logits)[real].abs().max())


# -- gathering -------------------------------------------------------------------------------------


@pytest.mark.parametrize("experts", [1, 4])
def test_sum_is_exact_when_every_gate_is_a_constant(experts):
    """E = k = 1 (g = 1 whatever the router) or k = E with equal router logits (g = 1/E), and a
    zero shared gate (s = ½): the dense sum of the experts is the mixture, with the gate means
    measured or taken from a uniform router. average and topk keeping all E experts are the sum."""
    teacher = _scale_up(moe_model(num_experts=experts, top_k=experts))
    with torch.no_grad():
        for layer in teacher.model.layers:
            layer.mlp.shared_expert_gate.weight.zero_()
            if experts > 1:
                layer.mlp.gate.weight.zero_()
    batch = _batch()
    inputs = calibration_inputs(teacher, [batch])
    assert inputs[0].shape == (4 * 40 - 15, 64)  # the real tokens only
    stats = gate_stats(teacher.model.layers[0].mlp, inputs[0])
    assert torch.allclose(stats.routed, torch.full((experts,), 1 / experts)) and stats.shared == pytest.approx(0.5)
    full = 128 + experts * 64
    for method, calib in (("sum", None), ("sum", inputs), ("average", inputs), ("topk", inputs)):
        student = gather_dense(teacher, method, width=full, inputs=calib)
        assert student.config.model_type == "llama" and student.config.intermediate_size == full
        assert _max_logit_gap(student, teacher, batch) < 1e-5, method


def test_sum_is_not_exact_when_the_gates_vary_per_token():
    teacher = _scale_up(moe_model())  # top-2 of 4 softmax-gated experts, a learned shared gate
    with torch.no_grad():
        for layer in teacher.model.layers:
            layer.mlp.shared_expert_gate.weight.normal_(0, 0.3)
    batch = _batch()
    student = gather_dense(teacher, "sum", inputs=calibration_inputs(teacher, [batch]))
    assert _max_logit_gap(student, teacher, batch) > 1e-2


@pytest.mark.parametrize("method,width", [("sum", 384), ("average", 256), ("topk", 256), ("svd", 256)])
def test_every_method_gives_a_loadable_dense_llama_the_engine_runs(tmp_path, method, width):
    tok = tiny_tokenizer()
    teacher = _scale_up(moe_model(vocab=len(tok)))
    batch = _batch(seed=1)
    student = gather_dense(teacher, method, inputs=calibration_inputs(teacher, [batch]))
    assert student.config.intermediate_size == width  # default: 4 × hidden (sum: all 128 + 4 × 64 neurons)
    assert student.config.attention_bias  # the teacher's q/k/v biases, copied
    attn = student.model.layers[0].self_attn
    assert torch.equal(attn.q_proj.bias, teacher.model.layers[0].self_attn.q_proj.bias)
    assert not attn.o_proj.bias.any()
    student.save_pretrained(tmp_path / "student")
    tok.save_pretrained(tmp_path / "student")
    loaded, _ = load_pretrained(tmp_path / "student")
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert _max_logit_gap(loaded, student, batch) < 1e-6

    # the embedded engine runs it through the dense decoder (biases included): greedy = the model's
    eng = TorchEngine(loaded, pad_token_id=0)
    assert isinstance(eng._decoder, LlamaDecoder)
    prompts = [batch["input_ids"][i, :n].tolist() for i, n in enumerate((7, 12))]
    out = eng.generate(prompts, SamplingParams(max_new_tokens=8, temperature=0))
    for p, c in zip(prompts, out):
        ids, ref = torch.tensor([p]), []
        with torch.no_grad():
            for _ in range(8):
                nxt = int(loaded(ids).logits[0, -1].argmax())
                ref.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        assert c.token_ids == ref


def test_topk_keeps_the_most_loaded_experts_and_the_mean_routed_mass():
    teacher = _scale_up(moe_model())
    block = teacher.model.layers[0].mlp
    student = gather_dense(teacher, "topk", load=torch.tensor([0.1, 0.5, 0.05, 0.35]))
    mlp = student.model.layers[0].mlp
    gate_up = block.experts.gate_up_proj
    # neurons: the shared expert's 128, then experts 1 and 3 (the two most loaded), in index order
    assert torch.equal(mlp.gate_proj.weight[128:192], gate_up[1, :64])
    assert torch.equal(mlp.up_proj.weight[192:], gate_up[3, 64:])
    # no data: a uniform router's gate means ḡ = k / E² = 1/8 each; the two kept carry all 4/8
    assert torch.allclose(mlp.down_proj.weight[:, 128:192], block.experts.down_proj[1] * 0.25)
    assert torch.allclose(mlp.down_proj.weight[:, :128], block.shared_expert.down_proj.weight * 0.5)


def test_gathering_names_what_it_cannot_use():
    teacher = moe_model()
    with pytest.raises(GatherError, match=r"teacher is a llama model, not a model.arch=moe one"):
        gather_dense(build_model(ModelConfig(hidden_size=64, num_layers=1, num_heads=2), VOCAB, 0, 1, 2), "sum")
    with pytest.raises(GatherError, match=r"gather='mean' is not one of sum, average, topk, svd"):
        gather_dense(teacher, "mean")
    with pytest.raises(GatherError, match=r"average width 200 must be the shared expert's 128 plus m × the expert"):
        gather_dense(teacher, "average", width=200)
    with pytest.raises(GatherError, match=r"sum keeps every neuron: its width is shared 128 \+ 4 experts × 64 = 384"):
        gather_dense(teacher, "sum", width=256)
    with pytest.raises(GatherError, match=r"svd gathering fits each layer on calibration tokens"):
        gather_dense(teacher, "svd")
    with pytest.raises(GatherError, match=r"topk keeps the most used experts"):
        gather_dense(teacher, "topk")
    assert gathered_width(teacher, "svd", 129) == 129 and gathered_width(teacher, "average", 384) == 384


def test_svd_fits_the_mixture_better_than_the_gate_means():
    teacher = _scale_up(moe_model())
    calib, held = _batch(seed=2, n=16, length=64), _batch(seed=3)
    inputs = calibration_inputs(teacher, [calib])
    gaps = {m: _max_logit_gap(gather_dense(teacher, m, inputs=inputs), teacher, held) for m in ("topk", "svd")}
    assert gaps["svd"] < gaps["topk"]


# -- distillation and the command line -------------------------------------------------------------


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory):
    """(recipe, a tiny moe run): gen-data, 8 SFT steps of model.arch=moe, then its experts and
    routers scaled up (what a few steps leave is all but the embedding's unigram model, which any
    student matches at once)."""
    root = tmp_path_factory.mktemp("ones")
    recipe = root / "tiny.yaml"
    recipe.write_text(TINY_RECIPE + f"out_dir: {root / 'moe'}\ndata_dir: {root / 'data'}\n")
    assert launch.main(["sft", str(recipe), "model.arch=moe", "+model.num_experts=4", "sft.steps=8"]) == 0
    folder = policy_folder(root / "moe")
    model, _ = load_pretrained(folder)
    torch.manual_seed(0)
    _scale_up(model).save_pretrained(folder)
    return recipe, root / "moe"


def test_distillation_lowers_the_kl_to_the_teacher(moe_run, tmp_path):
    from algos.config import load_config
    from algos.distill import distill_to_dense

    recipe, teacher = moe_run
    exp = load_config(recipe)
    report = distill_to_dense(exp, teacher, tmp_path / "student", gather="average", steps=12, lr=1e-3,
                              progress=False)
    assert report["heldout_kl_after"] < 0.7 * report["heldout_kl_before"]
    assert report["student_parameters"] < report["teacher_parameters"]
    assert json.loads((tmp_path / "student" / "distill.json").read_text())["gather"] == "average"
    rows = [json.loads(line) for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["distill/kl"] > 0 and rows[-1]["distill/heldout_kl_after"] == report["heldout_kl_after"]


def test_launch_distill_end_to_end(moe_run, tmp_path, capsys):
    from algos.recipes import _sft_finished

    recipe, teacher = moe_run
    out = tmp_path / "ones"
    capsys.readouterr()
    assert launch.main(["distill", str(recipe), "--teacher", str(teacher), "--gather", "svd", "--out", str(out),
                        "--steps", "3", "--baseline", str(teacher)]) == 0
    assert "OneS svd: student accuracy" in capsys.readouterr().out
    report = json.loads((out / "distill.json").read_text())
    assert report["steps"] == 3 and report["width"] == 256
    assert report["student_tokens_per_s"] > 0 and report["teacher_tokens_per_s"] > 0
    assert report["kept_gain"] is None  # the baseline is the teacher itself: no gain to keep
    model, _ = load_pretrained(out)
    assert model.config.model_type == "llama"
    for folder in (out, out / "teacher", out / "baseline"):  # each policy's held-out eval
        assert (folder / "eval" / "heldout_unseen.json").exists()
    assert _sft_finished(out, 10**6)  # a policy folder: rl.init_from starts RL from it


def test_launch_distill_named_errors(moe_run, tmp_path, capsys):
    recipe, teacher = moe_run
    dense = tmp_path / "dense"
    build_model(ModelConfig(hidden_size=64, num_layers=1, num_heads=2), VOCAB, 0, 1, 2).save_pretrained(dense)
    capsys.readouterr()
    assert launch.main(["distill", str(recipe), "--teacher", str(dense), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert f"--teacher {dense} holds a llama model, not a model.arch=moe one" in err and "Traceback" not in err
    assert launch.main(["distill", str(recipe), "--teacher", str(teacher), "--gather", "mean",
                        "--out", str(tmp_path / "x")]) == 2
    assert "error: --gather='mean' is not one of sum, average, topk, svd" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
