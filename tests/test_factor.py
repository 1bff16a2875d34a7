"""The `factor` backbone (FactorLLM: a dense FFN split into slice-experts with trained routers): the
split's exactness, the layer's math, the PA loss and balance term, router training, conversion
through launch.py into a folder SFT and RL start from, save/load, the engine's decoder (KV cache,
sessions, log-probs), and SFT / RL steps on DeepSpeed."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from rl_helpers import rl_experiment, tiny_tokenizer
from test_learner import synthetic_episodes

from agents.factor import (
    FactorMoE,
    FactorSplitError,
    balance_term,
    expert_outputs,
    ffn_flops_per_token,
    pa_loss,
    pa_teacher,
    parameter_counts,
    recording,
    routers,
    split_dense,
)
from agents.model import ModelConfig, auxiliary_losses, build_model, load_pretrained
from algos.config import ConfigError, RuntimeConfig, load_config
from algos.learner import Learner, build_critic
from algos.losses import clipped_policy_loss, loss_weights, token_logprobs
from rollout.decoders import decoder_for
from rollout.decoders.factor import FactorDecoder
from rollout.engine import SamplingParams, TorchEngine

VOCAB = 300
STOPS = tuple(range(3, VOCAB, 11))


def dense_model(seed: int = 0, vocab: int = VOCAB, intermediate: int = 256):
    torch.manual_seed(seed)
    cfg = ModelConfig(hidden_size=64, num_layers=2, num_heads=2, max_seq_len=256, intermediate_size=intermediate)
    return build_model(cfg, vocab, 0, 1, 2).eval()


def factor_model(seed: int = 0, vocab: int = VOCAB, experts: int = 4, top_k: int = 2):
    """A random dense model split into `experts` slices of 64 neurons, its routers scaled up so that
    routing is far from ties (what a trained router looks like, and what exactness checks need)."""
    model = split_dense(dense_model(seed, vocab, intermediate=64 * experts), experts, top_k)
    with torch.no_grad():
        for r in routers(model):
            r.weight.mul_(10)
    return model.eval()


def factor_config(**kw) -> ModelConfig:
    return ModelConfig(**{"arch": "factor", "hidden_size": 64, "num_layers": 2, "num_heads": 2, "num_experts": 4,
                          "top_k": 2, "intermediate_size": 256, "max_seq_len": 256, **kw})


def _prompts(n, seed=0, max_len=30):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len, (n,), generator=g)
    return [torch.randint(3, VOCAB, (int(k),), generator=g).tolist() for k in lengths]


# -- config ----------------------------------------------------------------------------------------


def test_factor_keys_defaults_and_named_errors(tiny_recipe):
    m = load_config(tiny_recipe, ["model.arch=factor"]).model
    assert (m.num_experts, m.top_k) == (8, 4)
    assert build_model(m, VOCAB, 0, 1, 2).config.model_type == "turnstile_factor"
    with pytest.raises(ConfigError, match=r"model.top_k=9 exceeds model.num_experts=8"):
        load_config(tiny_recipe, ["model.arch=factor", "+model.top_k=9"])
    with pytest.raises(ConfigError, match=r"model.intermediate_size=250 is not divisible by model.num_experts=8"):
        load_config(tiny_recipe, ["model.arch=factor", "+model.intermediate_size=250"])
    with pytest.raises(ConfigError, match=r"model.top_k applies to model.arch=moe/factor only"):
        load_config(tiny_recipe, ["+model.top_k=2"])
    with pytest.raises(ConfigError, match=r"rollout.backend=vllm cannot serve model.arch=factor"):
        load_config(tiny_recipe, ["model.arch=factor", "rollout.backend=vllm"])
    # split_dense names both sizes, and what it refuses
    with pytest.raises(FactorSplitError, match=r"intermediate_size=250 is not divisible by num_experts=8"):
        split_dense(dense_model(intermediate=250), 8, 4)
    with pytest.raises(FactorSplitError, match=r"top_k=5 exceeds num_experts=4"):
        split_dense(dense_model(), 4, 5)
    with pytest.raises(FactorSplitError, match=r"needs a dense Llama, got model_type=turnstile_factor"):
        split_dense(factor_model(), 4, 2)


# -- the split and the layer -----------------------------------------------------------------------


def test_the_experts_sum_to_the_dense_ffn_exactly_and_k_equal_e_is_the_dense_model():
    dense = dense_model()
    model = split_dense(dense, 8, 4)
    assert model.config.model_type == "turnstile_factor"
    assert (model.config.num_experts, model.config.num_experts_per_tok) == (8, 4)
    h = torch.randn(7, 64)
    for dense_layer, layer in zip(dense.model.layers, model.model.layers):
        block = layer.mlp
        act = F.silu(block.gate_proj(h)) * block.up_proj(h)  # [7, 256]
        experts = expert_outputs(act, block.down_proj.weight, 8)  # [7, 8, 64]
        with torch.no_grad():
            torch.testing.assert_close(experts.sum(1), dense_layer.mlp(h), rtol=0, atol=1e-6)
            # expert j is neurons [32 j, 32 j + 32): its own slice of gate/up rows and down columns
            j = 5
            sl = slice(32 * j, 32 * j + 32)
            act_j = F.silu(h @ block.gate_proj.weight[sl].T) * (h @ block.up_proj.weight[sl].T)  # [7, 32]
            own = act_j @ block.down_proj.weight[:, sl].T
            torch.testing.assert_close(experts[:, j], own, rtol=0, atol=1e-6)
    # k = E with a uniform router: every weight is E · (1/E) / 1 = 1, the factor model is the dense one
    full = split_dense(dense, 8, 8)
    with torch.no_grad():
        for r in routers(full):
            r.weight.zero_()
        ids = torch.randint(3, VOCAB, (2, 19))
        torch.testing.assert_close(full(ids).logits, dense(ids).logits, rtol=0, atol=1e-5)


def test_the_layer_is_the_renormalised_top_k_slices_times_e():
    model = factor_model(experts=4, top_k=2)
    block = model.model.layers[0].mlp
    h = torch.randn(5, 64)
    with torch.no_grad():
        p = torch.softmax(h @ block.router.weight.T, -1)
        top, chosen = p.topk(2, -1)
        act = F.silu(block.gate_proj(h)) * block.up_proj(h)
        experts = expert_outputs(act, block.down_proj.weight, 4)
        want = torch.stack([sum(4 * top[t, j] / top[t].sum() * experts[t, int(chosen[t, j])] for j in range(2))
                            for t in range(5)])
        torch.testing.assert_close(block(h[None])[0], want, rtol=1e-5, atol=1e-6)
    # equal chosen probabilities give the paper's E/k rescale: every weight is E · (1/k) = 2
    block2 = copy.deepcopy(block)
    with torch.no_grad():
        block2.router.weight.zero_()
        out = block2(h[None])[0]
        tied = torch.softmax(torch.zeros(5, 4), -1).topk(2, -1).indices  # whichever two the tie-break picks
        assert (torch.softmax(torch.zeros(5, 4), -1).topk(2, -1).values == 0.25).all()
        torch.testing.assert_close(out, 2 * experts.gather(1, tied[:, :, None].expand(5, 2, 64)).sum(1),
                                   rtol=1e-5, atol=1e-6)
    # parameters and FLOPs: a token runs 2 of the 4 slices of 64 neurons, 3 matrices each, in 2 layers
    total, active = parameter_counts(model)
    assert total == sum(p.numel() for p in model.parameters())
    assert total - active == 2 * (4 - 2) * 3 * 64 * 64
    flops = ffn_flops_per_token(model.config)
    assert flops["dense_ffn"] == 2 * 3 * 64 * 256 and flops["factor_ffn"] == 2 * 3 * 64 * 128 + 2 * 64 * 4
    assert flops["ratio"] == pytest.approx(0.5 + 4 / (3 * 256))


# -- the PA loss and the balance term --------------------------------------------------------------


def test_pa_loss_and_balance_term_equal_hand_computed_values():
    import math

    # E = 4, k = 2, C = 1, one token: experts' outputs 1, 2, 3, 4 -> FFN = 10, target FFN / (E/k) = 5
    experts = torch.tensor([[[1.0], [2.0], [3.0], [4.0]]])
    teacher = pa_teacher(experts, 2)  # ℓ = (16, 9, 4, 1): the best two are experts 2 and 3
    assert teacher.tolist() == [[0.0, 0.0, 1.0, 1.0]]
    logits = torch.tensor([[0.0, 1.0, 2.0, 0.5]])
    p = [math.exp(x) for x in logits[0].tolist()]
    p = [x / sum(p) for x in p]
    q = [1 / (2 + 2 * math.e)] * 2 + [math.e / (2 + 2 * math.e)] * 2  # softmax(0, 0, 1, 1)
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    assert float(pa_loss(logits, teacher)[0]) == pytest.approx(kl, rel=1e-6)
    assert float(pa_loss(torch.log(torch.tensor([q])), teacher)[0]) == pytest.approx(0.0, abs=1e-7)  # p = q
    # balance: mean over experts of the top-k mask times p; the router's top-2 here are experts 2 and 3
    chosen = torch.tensor([[2, 3]])
    assert float(balance_term(torch.tensor([p]), chosen)[0]) == pytest.approx((p[2] + p[3]) / 4, rel=1e-6)

    # the layer's auxiliary loss: 0.05 PA + 0.01 balance over the unpadded tokens, / layers
    model = factor_model(experts=4, top_k=2).train()
    block = model.model.layers[1].mlp
    ids = torch.randint(3, VOCAB, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    seen = {}
    handle = block.register_forward_hook(lambda m, args, out: seen.update(h=args[0].detach()))
    model(ids)
    handle.remove()
    loss, stats = block.auxiliary_loss(mask)
    h = seen["h"].reshape(12, 64)
    with torch.no_grad():
        logits = h @ block.router.weight.T
        act = F.silu(block.gate_proj(h)) * block.up_proj(h)
        tch = pa_teacher(expert_outputs(act, block.down_proj.weight, 4), 2)
        probs = torch.softmax(logits, -1)
        on = mask.reshape(12).bool()
        bal = balance_term(probs, probs.topk(2, -1).indices)
        want = (0.05 * pa_loss(logits, tch)[on].mean() + 0.01 * bal[on].mean()) / 2  # two layers
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-5)
    assert float(stats["pa_loss"] + stats["router_balance_loss"]) == pytest.approx(float(want), rel=1e-5)
    assert sum(float(stats[f"expert_load_{i}"]) for i in range(4)) == pytest.approx(0.5)  # one of two layers
    assert block.auxiliary_loss(mask) is None  # read once
    model.eval()
    model(ids)
    assert block.auxiliary_loss(mask) is None  # an eval forward records nothing ...
    with recording(model):
        model(ids)
    assert block.auxiliary_loss(mask) is not None  # ... unless asked to


# -- router training and conversion ----------------------------------------------------------------


def _examples(n, seed=0):
    from algos.sft import Example

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(8, 30, (1,), generator=g))
        ids = [1] + torch.randint(3, VOCAB, (k,), generator=g).tolist()
        out.append(Example(ids, [0] * 4 + [1] * (len(ids) - 4)))
    return out


def test_router_training_lowers_the_pa_loss_and_changes_only_the_routers():
    from algos.convert import compare, train_routers

    dense = dense_model()
    model = split_dense(dense, 4, 2)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    held = _examples(16, seed=1)
    before = compare(dense, model, held, 0, 8, "cpu")
    losses = train_routers(model, _examples(64), 0, 60, 8, 1e-2, 0, "cpu", progress=False)
    after = compare(dense, model, held, 0, 8, "cpu")
    # held-out tokens of a random model (seeds 0-2: -9 to -12%, overlap +0.08 to +0.12; a trained
    # model's fall is larger: docs/backbones.md)
    assert after["pa_loss"] < 0.93 * before["pa_loss"]
    assert after["router_teacher_overlap"] > before["router_teacher_overlap"] + 0.06
    assert sum(losses[-5:]) < sum(losses[:5])
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, start[k])}
    assert changed == {f"model.layers.{i}.mlp.router.weight" for i in range(2)}
    assert after["dense_lm_loss"] == before["dense_lm_loss"]
    assert all(p.requires_grad for p in model.parameters())  # handed back trainable


def test_convert_through_launch_writes_a_policy_folder_sft_and_rl_start_from(tiny_recipe, tmp_path):
    import launch
    from algos.checkpoint import latest_checkpoint

    small = ["sft.demos.num_examples=60", "eval.num_tasks=2", "eval.max_new_tokens=8", "sft.batch_size=4"]
    assert launch.main(["sft", str(tiny_recipe), "sft.steps=2", *small]) == 0
    dense, _ = load_pretrained(latest_checkpoint(tmp_path / "run") / "model")
    out = tmp_path / "factor"
    assert launch.main(["convert", str(tiny_recipe), "--from", str(tmp_path / "run"), "--out", str(out),
                        "--steps", "3", "model.arch=factor", "+model.num_experts=4", "+model.top_k=2", *small]) == 0
    model, tok = load_pretrained(out)
    assert model.config.model_type == "turnstile_factor"
    assert (model.config.num_experts, model.config.num_experts_per_tok) == (4, 2)
    report = json.loads((out / "convert.json").read_text())
    assert report["steps"] == 3 and report["after"]["tokens"] > 0
    assert report["ffn_flops_per_token_per_layer"]["ratio"] == pytest.approx(0.5 + 4 / (3 * 256))
    dense_sd = dense.state_dict()
    for k, v in model.state_dict().items():  # everything but the routers is the dense policy's
        assert k.endswith("router.weight") or torch.equal(v, dense_sd[k]), k
    # SFT continues from the folder (sft.init_from): the factor model and its tokenizer, its PA loss logged
    assert launch.main(["sft", str(tiny_recipe), f"sft.init_from={out}", f"out_dir={tmp_path / 'sft2'}",
                        "sft.steps=2", *small]) == 0
    tuned, tuned_tok = load_pretrained(latest_checkpoint(tmp_path / "sft2") / "model")
    assert tuned.config.model_type == "turnstile_factor" and tuned_tok.get_vocab() == tok.get_vocab()
    assert not torch.equal(tuned.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)
    rows = [json.loads(x) for x in (tmp_path / "sft2" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("sft/pa_loss", 0) > 0 for r in rows)
    # RL starts from it too (rl.init_from: a policy folder counts as a finished SFT, recipes.train goes to RL)
    from algos.recipes import _sft_finished
    from algos.rl import train_rl

    assert _sft_finished(out, 1000)
    exp = rl_experiment(tmp_path / "rl", iterations=1, save_every=1, tasks_per_iter=2, group_size=2,
                        minibatch_size=4, micro_batch_size=4)
    exp.model = factor_config(num_experts=4, top_k=2)
    assert set(train_rl(exp, out)) == {"before", "after"}
    rl_model, _ = load_pretrained(latest_checkpoint(exp.out_dir) / "model")
    assert rl_model.config.model_type == "turnstile_factor"
    assert not torch.equal(rl_model.model.layers[1].mlp.router.weight, model.model.layers[1].mlp.router.weight)
    # named errors: a non-llama folder (names the folder and its arch), a width E does not divide
    with pytest.raises(ValueError, match=rf"{out} holds a turnstile_factor model \(model.arch=factor\)"):
        from algos.convert import convert_to_factor

        convert_to_factor(load_config(tiny_recipe, small), out, tmp_path / "again", 1)
    assert launch.main(["convert", str(tiny_recipe), "--from", str(tmp_path / "run"), "--out", str(tmp_path / "x"),
                        "model.arch=factor", "+model.num_experts=3"]) == 2  # 256 neurons in 3 slices


# -- save / load, critic ---------------------------------------------------------------------------


def test_save_pretrained_round_trip_and_the_ppo_critic(tmp_path):
    from transformers import AutoModelForCausalLM

    model = factor_model()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(loaded) is type(model)
    assert (loaded.config.num_experts, loaded.config.num_experts_per_tok, loaded.config.router_pa_coef) == (4, 2, 0.05)
    assert all(torch.equal(t, loaded.state_dict()[k]) for k, t in model.state_dict().items())
    ids = torch.randint(3, VOCAB, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, loaded(ids).logits, rtol=0, atol=0)
    critic = build_critic(model)
    assert isinstance(critic.model.layers[0].mlp, FactorMoE)
    with torch.no_grad():
        assert critic(ids).logits.shape == (2, 17, 1)
        torch.testing.assert_close(critic.model(ids).last_hidden_state, model.model(ids).last_hidden_state)


# -- the embedded engine ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["decoder", "linear", "model"])
def test_kv_cached_greedy_with_sessions_equals_uncached_decoding(mode):
    model = factor_model(seed=1)
    eng = TorchEngine(model, pad_token_id=0, fast_forward=mode != "model")
    assert isinstance(eng._decoder, FactorDecoder) == (mode != "model")
    if mode == "linear":  # F.linear and one matmul pair per expert instead of oneDNN / grouped matmuls
        eng._decoder.onednn, eng._decoder.grouped_mm, eng._decoder._key = False, False, None
    params = SamplingParams(max_new_tokens=16, temperature=0, stop_token_ids=STOPS)
    prompts = _prompts(8, seed=2)
    reasons = set()
    for turn in range(2):
        out = eng.generate(prompts, params, sessions=range(8))
        for p, c in zip(prompts, out):
            ids, ref = torch.tensor([p]), []
            with torch.no_grad():
                for _ in range(16):
                    nxt = int(model(ids).logits[0, -1].argmax())
                    ref.append(nxt)
                    if nxt in STOPS:
                        break
                    ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
            assert c.token_ids == ref
            reasons.add(c.finish_reason)
        g = torch.Generator().manual_seed(10 + turn)
        prompts = [p + c.token_ids + torch.randint(3, VOCAB, (3,), generator=g).tolist() for p, c in zip(prompts, out)]
    assert reasons == {"stop", "length"}
    assert eng.stats["reused_tokens"] > 0


def test_the_decoder_runs_only_the_chosen_slices_and_matches_the_model():
    model = factor_model(seed=3)
    dec = decoder_for(model)
    assert isinstance(dec, FactorDecoder)
    dec.refresh()
    w = dec.layers[0]
    assert w.expert_gate_up.shape == (4, 128, 64) and w.expert_down.shape == (4, 64, 64)
    block = model.model.layers[0].mlp
    x = torch.randn(1, 6, 64)
    norm = F.rms_norm(x, (64,), w.mlp_norm, w.mlp_norm_eps)
    with torch.no_grad():
        torch.testing.assert_close(dec._mlp_block(x, w) - x, block(norm), rtol=1e-5, atol=1e-5)
    # one token: the two experts it did not choose never run (NaN weights there leave it finite)
    one = x[:, :1]
    chosen = torch.softmax(norm[0, :1] @ w.router.T, -1).topk(2, -1).indices[0].tolist()
    for e in set(range(4)) - set(chosen):
        w.expert_down[e].fill_(float("nan"))
    with torch.no_grad():
        torch.testing.assert_close(dec._mlp_block(one, w) - one, block(norm[:, :1]), rtol=1e-5, atol=1e-5)


def test_engine_logprobs_match_the_learners(tmp_path):
    from rollout.runner import EpisodeRunner

    tok = tiny_tokenizer()
    policy = factor_model(vocab=len(tok))
    exp = rl_experiment(tmp_path, algo="grpo")
    exp.model = factor_config()
    exp.rollout.max_turn_tokens = 12
    runner = EpisodeRunner.for_env(TorchEngine(policy, tok.pad_token_id), tok, "toy_two_turn", {}, exp.rollout, 256)
    trajs, _ = runner.play([{"id": "a"}, {"id": "b"}], group_size=3, seed=0)
    runner.close()
    assert all(tr.turns == 2 for tr in trajs)
    batch = Learner(exp, copy.deepcopy(policy), tok.pad_token_id).prepare(trajs, fast=False)
    on = batch.mask.bool()
    assert on.sum() >= 40
    assert float((batch.old_logp[on] - batch.behaviour_logp[on]).abs().max()) < 1e-4


# -- training steps on DeepSpeed -------------------------------------------------------------------


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_one_sft_step_lowers_the_loss_and_trains_the_router(zero_stage):
    from algos.runtime import init_deepspeed
    from algos.sft import sft_loss

    model = factor_model().train()
    router = model.model.layers[0].mlp.router.weight.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    engine = init_deepspeed(model, optimizer, scheduler, RuntimeConfig(device="cpu", zero_stage=zero_stage), 4, 1, 1.0)
    ids = torch.randint(3, VOCAB, (4, 24), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    loss, stats = sft_loss(engine, batch, 0.0)
    assert float(stats["pa_loss"]) > 0 and float(stats["router_balance_loss"]) > 0
    assert sum(float(stats[f"expert_load_{i}"]) for i in range(4)) == pytest.approx(1.0)  # averaged over layers
    torch.testing.assert_close(loss.detach(), engine(**batch).loss.detach() + stats["pa_loss"]
                               + stats["router_balance_loss"])
    engine.backward(loss)
    engine.step()
    with torch.no_grad():
        after, _ = sft_loss(engine, batch, 0.0)
    assert float(after) < float(loss.detach())
    assert not torch.equal(engine.module.model.layers[0].mlp.router.weight.detach(), router)


def _rl_objective(learner, batch) -> float:
    """The policy loss at the learner's current weights plus the factor auxiliary losses."""
    model = learner.policy
    with torch.no_grad(), recording(model):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
        aux, _ = auxiliary_losses(model, batch.attention_mask)
    logp = token_logprobs(logits, batch.input_ids[:, 1:])
    w = loss_weights(batch.mask, "token")
    pg, _ = clipped_policy_loss(logp, batch.old_logp, batch.advantages, w, 0.2, batch.tis_weights)
    return float(pg + aux)


@pytest.mark.parametrize("algo,zero_stage", [("grpo", 0), ("grpo", 2), ("ppo", 0)])
def test_one_rl_step_lowers_the_loss(tmp_path, algo, zero_stage):
    tok = tiny_tokenizer()
    exp = rl_experiment(tmp_path, algo=algo, minibatch_size=8, micro_batch_size=8, lr=1e-3)
    exp.model = factor_config()
    exp.runtime.zero_stage = zero_stage
    learner = Learner(exp, factor_model(vocab=len(tok)).train(), tok.pad_token_id)
    if algo == "ppo":
        assert isinstance(learner.critic_engine.module.model.layers[0].mlp, FactorMoE)
    trajs = synthetic_episodes(8)
    batch = learner.prepare(trajs, fast=False)
    before = _rl_objective(learner, batch)
    metrics = learner.update(trajs, seed=0)
    assert metrics["pa_loss"] > 0 and "router_teacher_overlap" in metrics
    assert _rl_objective(learner, batch) < before
