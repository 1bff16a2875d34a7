"""The `moe` backbone (routed + shared experts on Qwen2-MoE): config keys, the gate, the balance
loss, save/load, the engine's MoE decoder (KV cache, sessions, log-probs), routing replay, and one
SFT and one RL step on DeepSpeed."""
from __future__ import annotations

import copy

import pytest
import torch
from rl_helpers import rl_experiment, tiny_tokenizer
from test_learner import synthetic_episodes

from agents.model import ModelConfig, build_model
from agents.moe import RouterTap, balance_loss, checkpoint_state_dict, parameter_counts
from algos.config import ConfigError, RuntimeConfig, load_config
from algos.learner import Learner
from algos.losses import clipped_policy_loss, loss_weights, token_logprobs
from rollout.decoders import MoeDecoder
from rollout.engine import SamplingParams, TorchEngine

VOCAB = 300
STOPS = tuple(range(3, VOCAB, 11))


def moe_config(**kw) -> ModelConfig:
    return ModelConfig(**{"arch": "moe", "hidden_size": 64, "num_layers": 2, "num_heads": 2, "num_experts": 4,
                          "top_k": 2, "max_seq_len": 256, **kw})


def moe_model(seed: int = 0, vocab: int = VOCAB, **kw):
    torch.manual_seed(seed)
    return build_model(moe_config(**kw), vocab, 0, 1, 2).eval()


def _prompts(n, seed=0, max_len=30):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len, (n,), generator=g)
    return [torch.randint(3, VOCAB, (int(k),), generator=g).tolist() for k in lengths]


# -- config ----------------------------------------------------------------------------------------


def test_moe_keys_defaults_and_named_errors(tiny_recipe):
    exp = load_config(tiny_recipe, ["model.arch=moe"])
    m = exp.model
    assert (m.num_experts, m.top_k, m.expert_size, m.shared_expert_size, m.balance_coef) == (8, 2, None, None, 0.01)
    assert load_config(tiny_recipe).model.num_experts is None  # a llama section leaves them unset
    with pytest.raises(ConfigError, match=r"model.top_k=5 exceeds model.num_experts=4"):
        load_config(tiny_recipe, ["model.arch=moe", "+model.num_experts=4", "+model.top_k=5"])
    with pytest.raises(ConfigError, match=r"model.num_experts applies to model.arch=moe/factor only"):
        load_config(tiny_recipe, ["+model.num_experts=4"])
    with pytest.raises(ConfigError, match=r"model.intermediate_size is the dense MLP's width"):
        load_config(tiny_recipe, ["model.arch=moe", "model.intermediate_size=512"])
    with pytest.raises(ConfigError, match=r"model.arch"):
        load_config(tiny_recipe, ["model.arch=mixtral"])
    with pytest.raises(ConfigError, match=r"head size hidden_size/num_heads = 24"):  # vLLM's Qwen2-MoE: hidden/heads
        load_config(tiny_recipe, ["model.arch=moe", "model.hidden_size=96", "model.num_heads=4"])
    # vLLM serves Qwen2-MoE; routing replay needs the torch engine (it records the experts) and a moe
    assert load_config(tiny_recipe, ["model.arch=moe", "rollout.backend=vllm"]).rollout.backend == "vllm"
    assert load_config(tiny_recipe, ["model.arch=moe", "+rl.routing_replay=true"]).rl.routing_replay
    with pytest.raises(ConfigError, match=r"rl.routing_replay needs rollout.backend=torch"):
        load_config(tiny_recipe, ["model.arch=moe", "rollout.backend=vllm", "+rl.routing_replay=true"])
    with pytest.raises(ConfigError, match=r"rl.routing_replay needs model.arch=moe"):
        load_config(tiny_recipe, ["+rl.routing_replay=true"])


# -- the model -------------------------------------------------------------------------------------


def test_the_layer_is_top_k_softmax_unrenormalised_plus_the_gated_shared_expert():
    model = moe_model()
    cfg = model.config
    assert cfg.model_type == "qwen2_moe" and not cfg.norm_topk_prob
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size) \
        == (4, 2, 64, 128)  # expert width = hidden, shared = 2 × hidden (the defaults)
    block = model.model.layers[0].mlp
    h = torch.randn(5, 64)
    probs = torch.softmax(h @ block.gate.weight.T, -1)
    weights, chosen = probs.topk(2, -1)
    assert (weights.sum(-1) < 1).all()  # not renormalised

    def expert(e, x):
        gate, up = (x @ block.experts.gate_up_proj[e].T).chunk(2, -1)
        return (torch.nn.functional.silu(gate) * up) @ block.experts.down_proj[e].T

    routed = torch.stack([sum(weights[t, j] * expert(int(chosen[t, j]), h[t]) for j in range(2)) for t in range(5)])
    shared = torch.sigmoid(h @ block.shared_expert_gate.weight.T) * block.shared_expert(h)
    torch.testing.assert_close(block(h[None])[0], routed + shared)
    # parameters: a token runs 2 of the 4 experts of each of the 2 layers
    total, active = parameter_counts(model)
    assert total == sum(p.numel() for p in model.parameters())
    assert total - active == 2 * (4 - 2) * 3 * 64 * 64


def test_balance_loss_equals_the_hand_computed_value_and_relates_to_transformers():
    alpha = 0.01
    # one layer, E = 2, k = 1, three tokens; the third is padding
    p = torch.tensor([[0.8, 0.2], [0.6, 0.4], [0.1, 0.9]])
    chosen = torch.tensor([[0], [0], [1]])
    loss, load = balance_loss([p.log()], [chosen], torch.tensor([1, 1, 0]), alpha)
    # P = (0.7, 0.3); f = E × share of assignments = 2 × (2/2, 0/2) = (2, 0); L = α (0.7·2 + 0.3·0)
    assert float(loss) == pytest.approx(alpha * 1.4)
    torch.testing.assert_close(load, torch.tensor([1.0, 0.0]))
    # uniform gate probabilities: L = α whatever the assignment (Σ_i (1/E) f_i = 1)
    uniform = torch.zeros(6, 4)
    loss, _ = balance_loss([uniform], [torch.tensor([[0, 1]] * 6)], torch.ones(6), alpha)
    assert float(loss) == pytest.approx(alpha)
    # two layers: the mean of the per-layer losses
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(10, 4, generator=g) for _ in range(2)]
    picks = [torch.softmax(x, -1).topk(2, -1).indices for x in logits]
    per_layer = [float(balance_loss([x], [c], torch.ones(10), 1.0)[0]) for x, c in zip(logits, picks)]
    assert float(balance_loss(logits, picks, torch.ones(10), 1.0)[0]) == pytest.approx(sum(per_layer) / 2)
    # transformers' load_balancing_loss_func counts assignments over T, not T·k: k × ours for one layer
    from transformers.models.qwen2_moe.modeling_qwen2_moe import load_balancing_loss_func

    hf = float(load_balancing_loss_func((logits[0],), 4, 2))
    assert hf == pytest.approx(2 * per_layer[0], rel=1e-5)


def test_save_pretrained_round_trip_and_the_checkpoint_names_vllm_reads(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = moe_model()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert all(torch.equal(t, loaded.state_dict()[k]) for k, t in model.state_dict().items())
    ids = torch.randint(3, VOCAB, (2, 17))
    with torch.no_grad():  # same weights; the stacked expert matmuls round differently by ~1e-7 across copies
        torch.testing.assert_close(model(ids).logits, loaded(ids).logits, rtol=0, atol=1e-6)
    saved = load_file(tmp_path / "model.safetensors")
    # vLLM's Qwen2-MoE loader reads per-expert names, the router as mlp.gate and q/k/v biases
    for name in ("model.layers.1.mlp.experts.3.gate_proj.weight", "model.layers.0.mlp.experts.0.down_proj.weight",
                 "model.layers.0.mlp.gate.weight", "model.layers.0.mlp.shared_expert_gate.weight",
                 "model.layers.0.mlp.shared_expert.up_proj.weight", "model.layers.0.self_attn.q_proj.bias"):
        assert name in saved, name
    # checkpoint_state_dict gives the same names and tensors (what a weight push to vLLM needs)
    converted = checkpoint_state_dict(model.state_dict())
    assert set(converted) - set(saved) <= {"lm_head.weight"} and set(saved) <= set(converted)
    for name, t in saved.items():
        assert torch.equal(converted[name], t), name


# -- the embedded engine ---------------------------------------------------------------------------


def _engine(model, mode):
    """decoder: MoeDecoder (oneDNN matmuls and the grouped expert matmul where they work); linear:
    MoeDecoder on F.linear with one matmul pair per expert; model: the model's own forward with
    the engine's KV cache."""
    eng = TorchEngine(model, pad_token_id=0, fast_forward=mode != "model")
    if mode == "linear":
        eng._decoder.onednn, eng._decoder.grouped_mm, eng._decoder._key = False, False, None
    return eng


@pytest.mark.parametrize("mode", ["decoder", "linear", "model"])
def test_kv_cached_greedy_with_sessions_equals_uncached_decoding(mode):
    model = moe_model(seed=1)
    eng = _engine(model, mode)
    assert isinstance(eng._decoder, MoeDecoder) == (mode != "model")
    params = SamplingParams(max_new_tokens=16, temperature=0, stop_token_ids=STOPS)
    prompts = _prompts(8, seed=2)
    reasons = set()
    for turn in range(2):
        out = eng.generate(prompts, params, sessions=range(8))
        for p, c in zip(prompts, out):
            ids, ref = torch.tensor([p]), []
            with torch.no_grad():
                for _ in range(16):  # plain greedy decoding, the whole sequence re-run each token
                    nxt = int(model(ids).logits[0, -1].argmax())
                    ref.append(nxt)
                    if nxt in STOPS:
                        break
                    ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
            assert c.token_ids == ref
            reasons.add(c.finish_reason)
        g = torch.Generator().manual_seed(10 + turn)
        prompts = [p + c.token_ids + torch.randint(3, VOCAB, (3,), generator=g).tolist() for p, c in zip(prompts, out)]
    assert reasons == {"stop", "length"}  # rows finished at different steps: the batch was compacted
    assert eng.stats["reused_tokens"] > 0


def test_engine_logprobs_and_routing_match_the_learners(tmp_path):
    """Two-turn episodes through the runner (sessions): the learner's log-probs equal the engine's
    within 1e-4, and the recorded experts are the ones the learner's own forward picks."""
    tok = tiny_tokenizer()
    policy = moe_model(vocab=len(tok))
    trajs, exp = _episodes(tmp_path, tok, policy)
    learner = Learner(exp, copy.deepcopy(policy), tok.pad_token_id)
    batch = learner.prepare(trajs, fast=False)
    on = batch.mask.bool()
    assert on.sum() >= 40
    assert float((batch.old_logp[on] - batch.behaviour_logp[on]).abs().max()) < 1e-4
    recorded, own = _recorded_and_own_routing(trajs, policy)
    picked = (recorded >= 0).all(-1)  # [tokens, layers]
    assert picked.all(-1).float().mean() > 0.9  # every token but each episode's last
    assert torch.equal(recorded[picked], own[picked])


def _episodes(tmp_path, tok, policy, replay=False):
    from rollout.runner import EpisodeRunner

    exp = rl_experiment(tmp_path, algo="grpo")
    exp.model = moe_config()
    exp.rl.routing_replay = replay
    exp.rollout.max_turn_tokens = 12
    runner = EpisodeRunner.for_env(TorchEngine(policy, tok.pad_token_id), tok, "toy_two_turn", {}, exp.rollout, 256)
    trajs, _ = runner.play([{"id": "a"}, {"id": "b"}], group_size=3, seed=0)
    runner.close()
    assert all(tr.turns == 2 and tr.routing for tr in trajs)
    return trajs, exp


def _recorded_and_own_routing(trajs, model):
    """(recorded experts, the experts `model` picks itself) [tokens, layers, k], sorted within k, over
    every trajectory's tokens (−1 where nothing was recorded)."""
    from algos.learner import routed_experts

    recorded, own = [], []
    for tr in trajs:
        rec = routed_experts([tr], len(tr.token_ids))[0]  # [T, L, k]
        with torch.no_grad(), RouterTap(model) as tap:
            model(torch.tensor([tr.token_ids]))
        recorded.append(rec.sort(-1).values)
        own.append(torch.stack(tap.chosen, dim=1).sort(-1).values)  # [T, L, k]
    return torch.cat(recorded), torch.cat(own)


def test_routing_replay_makes_the_learner_route_as_the_engine_did(tmp_path):
    """Near-tied routers (the bf16 hazard): a perturbation far below the log-prob tolerance flips the
    learner's own top-k for many tokens. Replaying the engine's experts, the learner's log-probs
    still equal the engine's; routing by itself, they differ."""
    tok = tiny_tokenizer()
    policy = moe_model(vocab=len(tok))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in policy.model.layers:
            layer.mlp.gate.weight.copy_(1e-6 * torch.randn(layer.mlp.gate.weight.shape, generator=g))
            for w in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj):  # experts that differ a lot
                w.copy_(0.3 * torch.randn(w.shape, generator=g))
    perturbed = copy.deepcopy(policy)
    with torch.no_grad():
        for layer in perturbed.model.layers:
            layer.mlp.gate.weight.add_(1e-6 * torch.randn(layer.mlp.gate.weight.shape, generator=g))
    gaps = {}
    for replay in (True, False):
        trajs, exp = _episodes(tmp_path, tok, policy, replay=replay)
        batch = Learner(exp, copy.deepcopy(perturbed), tok.pad_token_id).prepare(trajs, fast=False)
        on = batch.mask.bool()
        gaps[replay] = float((batch.old_logp[on] - batch.behaviour_logp[on]).abs().max())
    recorded, own = _recorded_and_own_routing(trajs, perturbed)
    picked = (recorded >= 0).all(-1)
    assert (recorded[picked] != own[picked]).any(-1).float().mean() > 0.2  # its own routing differs
    assert gaps[True] < 1e-4
    assert gaps[False] > 1e-2


# -- training steps on DeepSpeed -------------------------------------------------------------------


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_one_sft_step_lowers_the_loss(zero_stage):
    from algos.runtime import init_deepspeed
    from algos.sft import sft_loss

    model = moe_model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    engine = init_deepspeed(model, optimizer, scheduler, RuntimeConfig(device="cpu", zero_stage=zero_stage), 4, 1, 1.0)
    ids = torch.randint(3, VOCAB, (4, 24), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    loss, stats = sft_loss(engine, batch, 0.01)
    assert float(stats["balance_loss"]) > 0.0099  # α at least (uniform routing gives exactly α)
    assert sum(float(stats[f"expert_load_{i}"]) for i in range(4)) == pytest.approx(1.0)
    torch.testing.assert_close(loss, engine(**batch).loss + stats["balance_loss"])  # the balance loss is in it
    engine.backward(loss)
    engine.step()
    with torch.no_grad():
        after, _ = sft_loss(engine, batch, 0.01)
    assert float(after) < float(loss.detach())


def _rl_objective(learner, batch) -> float:
    """The policy loss at the learner's current weights (π_old, advantages and TIS from `batch`)
    plus the balance loss: what one update step must lower."""
    with torch.no_grad(), RouterTap(learner.policy) as tap:
        logits = learner.policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    logp = token_logprobs(logits, batch.input_ids[:, 1:])
    w = loss_weights(batch.mask, "token")
    pg, _ = clipped_policy_loss(logp, batch.old_logp, batch.advantages, w, 0.2, batch.tis_weights)
    return float(pg + tap.balance_loss(batch.attention_mask, learner.balance_coef)[0])


@pytest.mark.parametrize("algo,zero_stage", [("grpo", 0), ("grpo", 2), ("ppo", 0)])
def test_one_rl_step_lowers_the_loss(tmp_path, algo, zero_stage):
    tok = tiny_tokenizer()
    exp = rl_experiment(tmp_path, algo=algo, minibatch_size=8, micro_batch_size=8, lr=1e-3)
    exp.model = moe_config()
    exp.runtime.zero_stage = zero_stage
    learner = Learner(exp, moe_model(vocab=len(tok)).train(), tok.pad_token_id)
    trajs = synthetic_episodes(8)
    batch = learner.prepare(trajs, fast=False)
    before = _rl_objective(learner, batch)
    metrics = learner.update(trajs, seed=0)
    assert metrics["balance_loss"] > 0.0099
    assert sum(metrics[f"expert_load_{i}"] for i in range(4)) == pytest.approx(1.0)
    assert _rl_objective(learner, batch) < before


# -- the whole path: SFT through launch.py, the RL loop with routing replay ------------------------


def test_sft_through_launch_logs_the_balance_loss_and_evaluates(tiny_recipe, tmp_path):
    import json

    import launch

    assert launch.main(["sft", str(tiny_recipe), "model.arch=moe", "+model.num_experts=4", "sft.demos.num_examples=60",
                        "eval.num_tasks=4", "eval.max_new_tokens=16"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    sft = [r for r in rows if "sft/loss" in r]
    assert sft and all(r["sft/balance_loss"] > 0 and len([k for k in r if "expert_load" in k]) == 4 for r in sft)
    assert json.loads((tmp_path / "run" / "eval" / "heldout_unseen.json").read_text())["summary"]["tasks"] == 4


def test_rl_loop_with_routing_replay_trains_and_saves_a_moe_policy(tmp_path):
    import json

    from agents.model import load_pretrained
    from algos.checkpoint import latest_checkpoint
    from algos.rl import train_rl

    tok = tiny_tokenizer()
    folder = tmp_path / "policy"
    moe_model(vocab=len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    exp = rl_experiment(tmp_path, iterations=2, save_every=2)
    exp.model, exp.rl.routing_replay = moe_config(), True
    assert set(train_rl(exp, folder)) == {"before", "after"}
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/balance_loss" in r]
    assert len(train) == 2 and all("train/expert_load_3" in r for r in train)
    model, _ = load_pretrained(latest_checkpoint(exp.out_dir) / "model")
    assert model.config.model_type == "qwen2_moe"
