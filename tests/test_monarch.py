"""The `monarch` backbone (Monarch MLP and optionally attention linears on a Llama): config keys,
MonarchLinear against its definition M = P_out · L · P · R, the projection onto Monarch matrices,
the parameter/FLOP report, save/load and the PPO critic, projecting a dense policy, the engine's
MonarchDecoder (KV cache, sessions, log-probs), and one SFT and one RL step on DeepSpeed."""
from __future__ import annotations

import copy

import pytest
import torch
from rl_helpers import rl_experiment, tiny_tokenizer
from test_learner import synthetic_episodes

from agents.model import ModelConfig, build_model
from agents.monarch import (
    MonarchLinear,
    format_report,
    monarch_rank,
    monarch_report,
    project,
    project_dense_model,
)
from algos.config import ConfigError, RuntimeConfig, load_config
from algos.learner import Learner, build_critic
from algos.losses import clipped_policy_loss, loss_weights, token_logprobs
from rollout.decoders import MonarchDecoder, decoder_for
from rollout.engine import SamplingParams, TorchEngine

VOCAB = 300
STOPS = tuple(range(3, VOCAB, 11))
# (in, out, blocks): square, hidden -> 4·hidden and back (r = 4), b² = n (r = 1, the paper's),
# b² > n (r = 1, narrower blocks), and a rank that is not min(n, m) / b² exactly (96 / 64 -> 2)
SHAPES = [(64, 64, 4), (64, 256, 4), (256, 64, 4), (64, 64, 8), (64, 128, 16), (96, 384, 8)]


def monarch_config(**kw) -> ModelConfig:
    return ModelConfig(**{"arch": "monarch", "hidden_size": 64, "num_layers": 2, "num_heads": 2, "max_seq_len": 256,
                          **kw})


def monarch_model(seed: int = 0, vocab: int = VOCAB, sharp: bool = False, **kw):
    """`sharp`: every projection 4× its initial scale, so the layers (not only the tied embedding,
    which at init makes a token predict itself) decide the greedy tokens the engine tests compare."""
    torch.manual_seed(seed)
    model = build_model(monarch_config(**kw), vocab, 0, 1, 2).eval()
    if sharp:
        with torch.no_grad():
            for module in model.model.layers.modules():
                if isinstance(module, MonarchLinear):
                    module.L.mul_(4)
                elif isinstance(module, torch.nn.Linear):
                    module.weight.mul_(4)
    return model


def _prompts(n, seed=0, max_len=30):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len, (n,), generator=g)
    return [torch.randint(3, VOCAB, (int(k),), generator=g).tolist() for k in lengths]


def _random_monarch(n, m, b, seed, bias=False) -> MonarchLinear:
    torch.manual_seed(seed)
    return MonarchLinear(n, m, b, bias=bias)


# -- config ----------------------------------------------------------------------------------------


def test_monarch_keys_defaults_and_named_errors(tiny_recipe):
    m = load_config(tiny_recipe, ["model.arch=monarch"]).model
    assert (m.monarch_blocks, m.monarch_attention) == (4, False)
    assert load_config(tiny_recipe).model.monarch_blocks is None  # a llama section leaves them unset
    assert load_config(tiny_recipe, ["model.arch=monarch", "+model.monarch_blocks=8",
                                     "+model.monarch_attention=true"]).model.monarch_attention
    with pytest.raises(ConfigError, match=r"model.monarch_blocks applies to model.arch=monarch only"):
        load_config(tiny_recipe, ["+model.monarch_blocks=4"])
    with pytest.raises(ConfigError, match=r"model.monarch_blocks=5 does not divide model.hidden_size=64"):
        load_config(tiny_recipe, ["model.arch=monarch", "+model.monarch_blocks=5"])
    with pytest.raises(ConfigError, match=r"model.monarch_blocks=4 does not divide model.intermediate_size=90"):
        load_config(tiny_recipe, ["model.arch=monarch", "model.intermediate_size=90"])
    # grouped-query attention: k/v are num_kv_heads × head size = 32 wide; 64 blocks fit 64 and 256, not 32
    assert load_config(tiny_recipe, ["model.arch=monarch", "+model.monarch_blocks=64", "model.num_kv_heads=1"])
    with pytest.raises(ConfigError, match=r"model.monarch_blocks=64 does not divide the key/value width "
                                          r"model.num_kv_heads × head size=32"):
        load_config(tiny_recipe, ["model.arch=monarch", "+model.monarch_blocks=64", "model.num_kv_heads=1",
                                  "+model.monarch_attention=true"])
    with pytest.raises(ConfigError, match=r"model.monarch_blocks"):
        load_config(tiny_recipe, ["model.arch=monarch", "+model.monarch_blocks=0"])
    # vLLM serves no Monarch model
    with pytest.raises(ConfigError, match=r"rollout.backend=vllm cannot serve model.arch=monarch"):
        load_config(tiny_recipe, ["model.arch=monarch", "rollout.backend=vllm"])
    with pytest.raises(ValueError, match=r"MonarchLinear: nblocks=8 does not divide out_features=60"):
        MonarchLinear(64, 60, 8)


# -- the Monarch linear ----------------------------------------------------------------------------


def _permutation(perm: list[int]) -> torch.Tensor:
    """The matrix P with (P v)[i] = v[perm[i]]."""
    P = torch.zeros(len(perm), len(perm))
    P[torch.arange(len(perm)), torch.tensor(perm)] = 1.0
    return P


@pytest.mark.parametrize("n,m,b", SHAPES)
def test_monarch_linear_is_P_out_L_P_R_with_block_diagonal_factors(n, m, b):
    """The forward and dense() against the definition built from explicit matrices: R and L
    block-diagonal (torch.block_diag of the b blocks), P the reshape-transpose routing slice j
    of each R block to L block j, P_out the strided output order."""
    lin = _random_monarch(n, m, b, seed=n + m + b, bias=True)
    r, p, s = lin.rank, n // b, m // b
    q = b * r
    assert r == max(1, -(-min(n, m) // (b * b))) and lin.R.shape == (b, q, p) and lin.L.shape == (b, s, q)
    R = torch.block_diag(*lin.R.detach())  # [b q, n]
    L = torch.block_diag(*lin.L.detach())  # [b s, b q]
    # middle entry (j, k, t) of L's input is entry (k, j, t) of R's output
    P = _permutation([k * q + j * r + t for j in range(b) for k in range(b) for t in range(r)])
    P_out = _permutation([j * s + i for i in range(s) for j in range(b)])  # output i·b + j is L's (j, i)
    M = P_out @ L @ P @ R
    torch.testing.assert_close(lin.dense().detach(), M, rtol=0, atol=1e-6)
    x = torch.randn(3, 5, n)
    torch.testing.assert_close(lin(x), x @ M.T + lin.bias, rtol=0, atol=1e-5)
    # parameters: b r (n + m) against n m; rank: full when the middle width b q covers min(n, m)
    assert lin.R.numel() + lin.L.numel() == b * r * (n + m)
    if b * b <= min(n, m):
        assert torch.linalg.matrix_rank(M) == min(n, m)
    # a drop-in: gradients reach both factors
    lin(x).square().sum().backward()
    assert lin.R.grad.abs().sum() > 0 and lin.L.grad.abs().sum() > 0


@pytest.mark.parametrize("n,m,b", SHAPES)
def test_projection_is_exact_for_a_monarch_matrix_and_nearest_for_a_dense_one(n, m, b):
    monarch = _random_monarch(n, m, b, seed=1).dense().detach()
    projected = MonarchLinear.from_dense(monarch, b).dense().detach()
    err = float((projected - monarch).abs().max())
    assert err < 1e-5 * float(monarch.abs().max()) + 1e-7, err
    # a random dense matrix: the projection is no farther from it than a random Monarch matrix
    # at its best scale, and it is the nearest (Frobenius): its squared error is the sum of the
    # singular values each block's rank-r SVD drops, and perturbing its factors only adds error
    W = torch.randn(m, n, generator=torch.Generator().manual_seed(2)) / n**0.5
    near = MonarchLinear.from_dense(W, b)
    error = float((near.dense().detach() - W).norm())
    for seed in range(20):
        other = _random_monarch(n, m, b, seed=100 + seed).dense().detach()
        scale = float((W * other).sum() / other.square().sum())
        assert error <= float((W - scale * other).norm())
    blocks = W.reshape(m // b, b, b, n // b).permute(1, 2, 0, 3).double()  # [j, k, s, p]
    dropped = torch.linalg.svdvals(blocks)[..., monarch_rank(n, m, b):]
    assert error**2 == pytest.approx(float(dropped.square().sum()), rel=1e-4)
    for seed in range(5):
        g = torch.Generator().manual_seed(200 + seed)
        moved = copy.deepcopy(near)
        with torch.no_grad():
            moved.R.add_(1e-2 * torch.randn(moved.R.shape, generator=g))
            moved.L.add_(1e-2 * torch.randn(moved.L.shape, generator=g))
        assert float((moved.dense().detach() - W).norm()) > error
    # projecting a projection changes nothing
    R, L = project(near.dense().detach(), b)
    again = MonarchLinear(n, m, b)
    with torch.no_grad():
        again.R.copy_(R)
        again.L.copy_(L)
    torch.testing.assert_close(again.dense(), near.dense(), rtol=0, atol=1e-5)


def test_parameters_and_flops_per_layer():
    rows = monarch_report(monarch_model(monarch_attention=True))
    by_name = {(x["layer"], x["name"]): x for x in rows}
    assert len(rows) == 2 * 7
    # hidden 64 -> 256 and back with b = 4: r = 64 / 16 = 4, R [4, 16, 16] and L [4, 64, 16]
    gate = by_name[(0, "mlp.gate_proj")]
    assert (gate["rank"], gate["params"], gate["dense_params"]) == (4, 4 * 16 * 16 + 4 * 64 * 16, 64 * 256)
    assert gate["flops"] == 2 * gate["params"] and gate["dense_flops"] == 2 * 64 * 256
    assert by_name[(1, "mlp.down_proj")]["params"] == 5120
    assert by_name[(0, "self_attn.q_proj")]["params"] == 2 * 4 * 16 * 16  # 64 x 64: half the dense 4096
    # dense attention (the default) reports its own counts
    dense_attn = {x["name"]: x for x in monarch_report(monarch_model()) if x["layer"] == 0}
    assert dense_attn["self_attn.o_proj"]["kind"] == "dense" and dense_attn["self_attn.o_proj"]["params"] == 4096
    # the model's whole parameter count is the embedding, the norms and these rows
    model = monarch_model(monarch_attention=True)
    norms = 2 * 2 * 64 + 64
    assert sum(p.numel() for p in model.parameters()) == VOCAB * 64 + norms + sum(x["params"] for x in rows)
    table = format_report(rows)
    print(table)  # what docs/backbones.md shows (pytest -s)
    assert "mlp total" in table and "0.312" in table  # the MLP at 5 / 16 of the dense FLOPs


# -- the transformers model ------------------------------------------------------------------------


@pytest.mark.parametrize("attention", [False, True])
def test_save_pretrained_round_trip_and_the_ppo_critic(tmp_path, attention):
    from transformers import AutoModelForCausalLM

    from agents.model import load_pretrained

    model = monarch_model(monarch_attention=attention, monarch_blocks=8)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(loaded) is type(model) and loaded.config.model_type == "turnstile_monarch"
    assert (loaded.config.monarch_blocks, loaded.config.monarch_attention) == (8, attention)
    assert isinstance(loaded.model.layers[1].self_attn.v_proj, MonarchLinear) == attention
    assert loaded.model.layers[0].mlp.up_proj.nblocks == 8
    assert all(torch.equal(t, loaded.state_dict()[k]) for k, t in model.state_dict().items())
    ids = torch.randint(3, VOCAB, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, loaded(ids).logits, rtol=0, atol=0)
    tok = tiny_tokenizer()
    tok.save_pretrained(tmp_path)
    assert type(load_pretrained(tmp_path)[0]) is type(model)
    # the PPO critic: the policy's backbone (same weights, same hidden states) and a zero value head
    critic = build_critic(model)
    assert isinstance(critic.model.layers[0].mlp.down_proj, MonarchLinear)
    with torch.no_grad():
        torch.testing.assert_close(critic.model(ids).last_hidden_state, model.model(ids).last_hidden_state)
        assert critic(ids).logits.shape == (2, 17, 1) and critic(ids).logits.abs().max() == 0


def _monarch_structured_llama(seed: int, attention: bool, b: int = 4):
    """A dense Llama policy whose MLP (and attention) weights are Monarch matrices."""
    torch.manual_seed(seed)
    dense = build_model(ModelConfig(hidden_size=64, num_layers=2, num_heads=2, max_seq_len=256), VOCAB, 0, 1, 2).eval()
    with torch.no_grad():
        for layer in dense.model.layers:
            linears = [getattr(layer.mlp, n) for n in ("gate_proj", "up_proj", "down_proj")]
            if attention:
                linears += [getattr(layer.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
            for lin in linears:
                lin.weight.copy_(MonarchLinear(lin.in_features, lin.out_features, b).dense())
    return dense


@pytest.mark.parametrize("attention", [False, True])
def test_project_dense_model_is_exact_on_monarch_weights_and_projects_the_others(attention):
    dense = _monarch_structured_llama(3, attention)
    monarch = project_dense_model(dense, 4, attention=attention)
    assert monarch.config.model_type == "turnstile_monarch" and monarch.config.monarch_attention == attention
    assert not monarch.training
    ids = torch.randint(3, VOCAB, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        err = float((monarch(ids).logits - dense(ids).logits).abs().max())
    assert err < 1e-5, err
    # a dense Llama's own weights: each Monarch layer is the projection of its dense weight; the rest is copied
    torch.manual_seed(5)
    trained = build_model(ModelConfig(hidden_size=64, num_layers=2, num_heads=2, max_seq_len=256), VOCAB, 0, 1, 2)
    projected = project_dense_model(trained, 4)
    for name, t in trained.state_dict().items():
        if "mlp" not in name:
            assert torch.equal(projected.state_dict()[name], t), name
    lin = trained.model.layers[1].mlp.down_proj
    torch.testing.assert_close(projected.model.layers[1].mlp.down_proj.dense(),
                               MonarchLinear.from_dense(lin.weight, 4).dense(), rtol=0, atol=1e-6)
    assert isinstance(projected.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    with pytest.raises(ValueError, match=r"project_dense_model takes a dense Llama policy, not "
                                         r"model_type=turnstile_monarch"):
        project_dense_model(projected)


# -- the embedded engine ---------------------------------------------------------------------------


@pytest.mark.parametrize("attention,kv_heads", [(False, 2), (True, 2), (True, 1)])
def test_decoder_forward_equals_the_models_own_with_and_without_a_cache(attention, kv_heads):
    """MonarchDecoder's last-position logits against the model's own forward: a whole prompt, a
    prompt whose prefix is cached, one-token steps; oneDNN (dense parts) and F.linear."""
    from rollout.kv_cache import GrowingCache

    model = monarch_model(seed=5, sharp=True, monarch_attention=attention, num_kv_heads=kv_heads)
    decoder = decoder_for(model)
    assert isinstance(decoder, MonarchDecoder)
    ids = torch.randint(3, VOCAB, (3, 20), generator=torch.Generator().manual_seed(6))
    positions = torch.arange(20).expand(3, 20)
    with torch.no_grad():
        ref = model(ids).logits  # [3, 20, V]
    for onednn in {decoder.onednn, False}:
        decoder.onednn, decoder._key = onednn, None
        decoder.refresh()

        def run(cache, a, b):
            causal = torch.arange(b)[None, :] <= torch.arange(a, b)[:, None]  # [b - a, b]
            with torch.no_grad():
                return decoder(ids[:, a:b], positions[:, a:b], cache.layers, causal.expand(3, 1, b - a, b))

        whole = run(GrowingCache(2), 0, 20)
        cache = GrowingCache(2)
        prefix, rest = run(cache, 0, 12), run(cache, 12, 18)
        steps = [run(cache, t, t + 1) for t in (18, 19)]
        for got, col in [(whole, 19), (prefix, 11), (rest, 17), (steps[0], 18), (steps[1], 19)]:
            assert torch.allclose(got, ref[:, col], atol=1e-5), (onednn, col, (got - ref[:, col]).abs().max())


def _engine(model, mode):
    """decoder: MonarchDecoder (oneDNN for the dense matmuls where it works); linear: MonarchDecoder
    on F.linear; model: the model's own forward with the engine's KV cache."""
    eng = TorchEngine(model, pad_token_id=0, fast_forward=mode != "model")
    if mode == "linear":
        eng._decoder.onednn, eng._decoder._key = False, None
    return eng


@pytest.mark.parametrize("mode,attention", [("decoder", False), ("decoder", True), ("linear", False),
                                            ("model", True)])
def test_kv_cached_greedy_with_sessions_equals_uncached_decoding(mode, attention):
    model = monarch_model(seed=1, sharp=True, monarch_attention=attention)
    eng = _engine(model, mode)
    assert isinstance(eng._decoder, MonarchDecoder) == (mode != "model")
    params = SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=STOPS)
    prompts = _prompts(6, seed=2)
    reasons = set()
    for turn in range(2):
        out = eng.generate(prompts, params, sessions=range(6))
        for p, c in zip(prompts, out):
            ids, ref = torch.tensor([p]), []
            with torch.no_grad():
                for _ in range(12):  # plain greedy decoding, the whole sequence re-run each token
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


def test_engine_logprobs_match_the_learners(tmp_path):
    """Two-turn episodes through the runner (sessions) on MonarchDecoder: the learner's log-probs
    (the model's own forward) equal the engine's within 1e-4."""
    from rollout.runner import EpisodeRunner

    tok = tiny_tokenizer()
    policy = monarch_model(vocab=len(tok), sharp=True, monarch_attention=True)
    exp = rl_experiment(tmp_path, algo="grpo")
    exp.model = monarch_config(monarch_attention=True)
    exp.rollout.max_turn_tokens = 12
    engine = TorchEngine(policy, tok.pad_token_id)
    assert isinstance(engine._decoder, MonarchDecoder)
    runner = EpisodeRunner.for_env(engine, tok, "toy_two_turn", {}, exp.rollout, 256)
    trajs, _ = runner.play([{"id": "a"}, {"id": "b"}], group_size=3, seed=0)
    runner.close()
    assert all(tr.turns == 2 for tr in trajs)
    batch = Learner(exp, copy.deepcopy(policy), tok.pad_token_id).prepare(trajs, fast=False)
    on = batch.mask.bool()
    assert on.sum() >= 40
    assert float((batch.old_logp[on] - batch.behaviour_logp[on]).abs().max()) < 1e-4


# -- training steps on DeepSpeed -------------------------------------------------------------------


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_one_sft_step_lowers_the_loss(zero_stage):
    from algos.runtime import init_deepspeed
    from algos.sft import sft_loss

    model = monarch_model(monarch_attention=True).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    engine = init_deepspeed(model, optimizer, scheduler, RuntimeConfig(device="cpu", zero_stage=zero_stage), 4, 1, 1.0)
    ids = torch.randint(3, VOCAB, (4, 24), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    loss, stats = sft_loss(engine, batch, 0.01)
    assert stats == {}  # no auxiliary loss
    engine.backward(loss)
    engine.step()
    with torch.no_grad():
        after, _ = sft_loss(engine, batch, 0.01)
    assert float(after) < float(loss.detach())


def _rl_objective(learner, batch) -> float:
    """The policy loss at the learner's current weights (π_old, advantages and TIS from `batch`)."""
    with torch.no_grad():
        logits = learner.policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    logp = token_logprobs(logits, batch.input_ids[:, 1:])
    w = loss_weights(batch.mask, "token")
    return float(clipped_policy_loss(logp, batch.old_logp, batch.advantages, w, 0.2, batch.tis_weights)[0])


@pytest.mark.parametrize("algo,zero_stage", [("grpo", 0), ("grpo", 3), ("ppo", 0)])
def test_one_rl_step_lowers_the_loss(tmp_path, algo, zero_stage):
    tok = tiny_tokenizer()
    exp = rl_experiment(tmp_path, algo=algo, minibatch_size=8, micro_batch_size=8, lr=1e-3)
    exp.model = monarch_config()
    exp.runtime.zero_stage = zero_stage
    learner = Learner(exp, monarch_model(vocab=len(tok)).train(), tok.pad_token_id)
    if algo == "ppo":
        assert isinstance(learner.critic_engine.module.model.layers[0].mlp.gate_proj, MonarchLinear)
    trajs = synthetic_episodes(8)
    batch = learner.prepare(trajs, fast=False)
    before = _rl_objective(learner, batch)
    learner.update(trajs, seed=0)
    assert _rl_objective(learner, batch) < before
