"""The `mod` backbone (mixture of depths, causal threshold routing, on Llama): config keys, the
routed layer against a per-token reference, causality, the capacity regulariser, save/load and
the critic, the engine's decoder (KV cache with skipped tokens, sessions, log-probs), and one SFT
and one RL step on DeepSpeed."""
from __future__ import annotations

import copy

import pytest
import torch
from rl_helpers import rl_experiment, tiny_tokenizer
from test_learner import synthetic_episodes

from agents.mod import SKIPPED_VALUE, ModForCausalLM, flops_per_token, parameter_counts
from agents.model import ModelConfig, auxiliary_losses, build_model
from algos.config import ConfigError, RuntimeConfig, load_config
from algos.learner import Learner
from algos.losses import clipped_policy_loss, loss_weights, token_logprobs
from rollout.decoders import ModDecoder
from rollout.engine import SamplingParams, TorchEngine

VOCAB = 300
STOPS = tuple(range(3, VOCAB, 11))


def mod_config(**kw) -> ModelConfig:
    """3 layers: 0 and 2 routed (the first layer reads the embeddings), 1 dense in between."""
    return ModelConfig(**{"arch": "mod", "hidden_size": 64, "num_layers": 3, "num_heads": 2, "max_seq_len": 256,
                          "mod_layers": [0, 2], **kw})


def mod_model(seed: int = 0, vocab: int = VOCAB, mixed: bool = True, **kw) -> ModForCausalLM:
    """mixed: routers with random weights and no bias, so that about half the tokens skip each
    routed layer (a fresh model's biased routers run every token)."""
    torch.manual_seed(seed)
    model = build_model(mod_config(**kw), vocab, 0, 1, 2).eval()
    if mixed:
        g = torch.Generator().manual_seed(seed + 100)
        with torch.no_grad():
            for layer in model.model.layers:
                if layer.router is not None:
                    layer.router.weight.copy_(0.3 * torch.randn(layer.router.weight.shape, generator=g))
                    layer.router.bias.zero_()
    return model


def _prompts(n, seed=0, max_len=30):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len, (n,), generator=g)
    return [torch.randint(3, VOCAB, (int(k),), generator=g).tolist() for k in lengths]


def _rates(model, ids) -> list[float]:
    with torch.no_grad():
        model(ids)
    return [float((p > model.config.mod_threshold).float().mean()) for p in model.model.last_probs]


# -- config ----------------------------------------------------------------------------------------


def test_mod_keys_defaults_and_named_errors(tiny_recipe):
    m = load_config(tiny_recipe, ["model.arch=mod", "model.num_layers=4"]).model
    assert (m.mod_capacity, m.mod_layers, m.mod_threshold, m.mod_coef) == (0.5, None, 0.5, 0.01)
    torch.manual_seed(0)
    assert build_model(m, VOCAB, 0, 1, 2).config.mod_layers == [1, 2]  # all but the first and the last
    assert load_config(tiny_recipe).model.mod_capacity is None  # a llama section leaves them unset
    bad = {
        "model.mod_capacity=0": r"model.mod_capacity=0.0 is outside \(0, 1\]",
        "model.mod_capacity=1.5": r"model.mod_capacity=1.5 is outside \(0, 1\]",
        "model.mod_threshold=1": r"model.mod_threshold=1.0 is outside \(0, 1\)",
        "model.mod_layers=[1,5]": r"model.mod_layers names layers \[5\]; the model has layers 0..1",
        "model.mod_layers=[-1]": r"model.mod_layers names layers \[-1\]",
        "model.mod_layers=[1,1]": r"model.mod_layers=\[1, 1\] names a layer twice",
        "model.mod_layers=[]": r"model.mod_layers=\[\] routes no layer",
    }
    for override, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            load_config(tiny_recipe, ["model.arch=mod", "+" + override])
    with pytest.raises(ConfigError, match=r"model.mod_layers=None routes no layer .*model.num_layers=2"):
        load_config(tiny_recipe, ["model.arch=mod"])  # 2 layers: none between the first and the last
    with pytest.raises(ConfigError, match=r"model.mod_capacity applies to model.arch=mod only"):
        load_config(tiny_recipe, ["+model.mod_capacity=0.5"])
    with pytest.raises(ConfigError, match=r"rollout.backend=vllm cannot serve model.arch=mod"):
        load_config(tiny_recipe, ["model.arch=mod", "+model.mod_layers=[1]", "rollout.backend=vllm"])


# -- the model -------------------------------------------------------------------------------------


def _reference_logits(model: ModForCausalLM, ids: list[int]) -> torch.Tensor:
    """The backbone written out token by token from its weights (one unpadded sequence): in a routed
    layer token t runs when p_t > τ, attends to the tokens s ≤ t that also run, and adds p_t (a + m);
    a skipped token keeps x. Returns logits [T, V]."""
    inner, cfg = model.model, model.config
    H, D = cfg.num_attention_heads, cfg.head_dim
    T = len(ids)
    x = inner.embed_tokens(torch.tensor(ids))  # [T, C]
    cos, sin = (c[0] for c in inner.rotary_emb(x[None], torch.arange(T)[None]))  # [T, D]

    def rope(v):  # [T, H, D]
        return v * cos[:, None] + torch.cat([-v[..., D // 2 :], v[..., : D // 2]], -1) * sin[:, None]

    for layer in inner.layers:
        att = layer.self_attn
        h = layer.input_layernorm(x)
        if layer.router is not None:
            p = torch.sigmoid(h @ layer.router.weight[0] + layer.router.bias[0])  # [T]
            run = p > cfg.mod_threshold
        else:
            p, run = torch.ones(T), torch.ones(T, dtype=torch.bool)
        q, k, v = (rope(att.q_proj(h).view(T, H, D)), rope(att.k_proj(h).view(T, H, D)), att.v_proj(h).view(T, H, D))
        out = x.clone()
        for t in range(T):
            if not run[t]:
                continue
            keys = [s for s in range(t + 1) if run[s]]
            w = torch.softmax(torch.einsum("hd,shd->hs", q[t], k[keys]) * att.scaling, dim=-1)  # [H, S]
            a = att.o_proj(torch.einsum("hs,shd->hd", w, v[keys]).reshape(H * D))
            m = layer.mlp(layer.post_attention_layernorm(x[t] + a))
            out[t] = x[t] + (p[t] * (a + m) if layer.router is not None else a + m)
        x = out
    return model.lm_head(inner.norm(x))


def test_the_forward_equals_the_per_token_reference_and_skipped_tokens_are_absent():
    model = mod_model()
    ids = torch.randint(3, VOCAB, (1, 40), generator=torch.Generator().manual_seed(0))
    rates = _rates(model, ids)
    assert all(0.2 < r < 0.8 for r in rates), rates  # both kinds of token in both routed layers
    with torch.no_grad():
        logits = model(ids).logits[0]
        torch.testing.assert_close(logits, _reference_logits(model, ids[0].tolist()), rtol=0, atol=2e-5)
    # a fresh model's routers run every token (p = σ(2) at τ = 0.5): SFT starts near the dense model
    fresh = mod_model(mixed=False)
    assert _rates(fresh, ids) == [1.0, 1.0]
    torch.testing.assert_close(fresh.model.last_probs[0], torch.full((1, 40), 0.8808), atol=0.05, rtol=0)
    # the block output is scaled by p, so the language-model loss alone trains the routers
    model.train()
    model(ids, labels=ids).loss.backward()
    assert all(float(layer.router.weight.grad.abs().sum()) > 0 for layer in model.model.layers if layer.router)


def test_changing_future_tokens_never_changes_past_outputs_or_routing():
    model = mod_model()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (3, 32), generator=g)
    with torch.no_grad():
        before = model(ids).logits
        routed_before = [p > 0.5 for p in model.model.last_probs]
        for t in (0, 9, 20):
            changed = ids.clone()
            changed[:, t + 1 :] = torch.randint(3, VOCAB, changed[:, t + 1 :].shape, generator=g)
            after = model(changed).logits
            torch.testing.assert_close(after[:, : t + 1], before[:, : t + 1], rtol=0, atol=1e-5)
            for p, r in zip(model.model.last_probs, routed_before):
                assert torch.equal(p[:, : t + 1] > 0.5, r[:, : t + 1])
            assert (after[:, t + 1 :] - before[:, t + 1 :]).abs().max() > 1e-2  # the future did change
    # right padding: the real tokens' logits are those of the unpadded rows
    am = torch.ones_like(ids)
    am[1, 20:] = 0
    with torch.no_grad():
        padded = model(ids, attention_mask=am).logits[1, :20]
        torch.testing.assert_close(padded, model(ids[1:2, :20]).logits[0], rtol=0, atol=1e-5)


def test_capacity_regulariser_equals_the_hand_computed_value():
    model = mod_model()
    inner = model.model
    # two routed layers, three tokens, the third one padding
    inner.last_probs = [torch.tensor([[0.9, 0.7, 0.1]]), torch.tensor([[0.2, 0.6, 0.99]])]
    loss, stats = inner.auxiliary_loss(torch.tensor([[1, 1, 0]]))
    # mean p over the 2 real tokens of both layers = (0.9 + 0.7 + 0.2 + 0.6) / 4 = 0.6
    assert float(loss) == pytest.approx(0.01 * (0.6 - 0.5) ** 2)
    assert float(stats["capacity_loss"]) == pytest.approx(0.01 * 0.1**2)
    assert float(stats["mod_prob"]) == pytest.approx(0.6)
    assert float(stats["mod_rate_0"]) == 1.0 and float(stats["mod_rate_2"]) == 0.5  # 0.2 skips, 0.6 runs
    # through a real forward and agents.model.auxiliary_losses: routers with zero weights give
    # p = σ(b) for every token, 0.7 in layer 0 and 0.9 in layer 2
    with torch.no_grad():
        for layer, p in zip((inner.layers[0], inner.layers[2]), (0.7, 0.9)):
            layer.router.weight.zero_()
            layer.router.bias.fill_(torch.logit(torch.tensor(p)))
    ids = torch.randint(3, VOCAB, (2, 8))
    model(ids)
    total, stats = auxiliary_losses(model, torch.ones(2, 8))
    assert float(total.detach()) == pytest.approx(0.01 * (0.8 - 0.5) ** 2, rel=1e-5)
    assert set(stats) == {"capacity_loss", "mod_prob", "mod_rate_0", "mod_rate_2"}
    with pytest.raises(ValueError, match=r"token mask \(2, 7\) for a forward over \(2, 8\) tokens"):
        inner.auxiliary_loss(torch.ones(2, 7))


def test_parameter_and_flop_counts():
    model = mod_model()
    cfg = model.config
    C, F_, L = 64, 256, 3
    block = 4 * C * C + 3 * C * F_  # q, k, v, o (2 heads of 32, no biases) and the SwiGLU MLP
    total, active = parameter_counts(model, {0: 0.5, 2: 0.25})
    assert total == sum(p.numel() for p in model.parameters())
    assert active == pytest.approx(total - 0.5 * block - 0.75 * block)
    f = flops_per_token(cfg, {0: 1.0, 2: 1.0}, context=100)
    per_layer = 2 * block + 4 * C * 100
    assert f["dense"] == L * per_layer and f["mod"] == f["mod_ideal"] == f["dense"] + 2 * 2 * C  # + the routers
    f = flops_per_token(cfg, {0: 0.0, 2: 0.0}, context=100)
    assert f["mod"] == per_layer + 2 * (2 * C + 4 * C * 100) and f["mod_ideal"] == per_layer + 2 * 2 * C


def test_save_pretrained_round_trip_and_the_critic(tmp_path):
    from agents.model import load_pretrained
    from algos.learner import build_critic

    tok = tiny_tokenizer()
    model = mod_model(vocab=len(tok), mod_capacity=0.3, mod_threshold=0.4, mod_coef=0.2)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, _ = load_pretrained(tmp_path)
    assert type(loaded) is ModForCausalLM and loaded.config.model_type == "turnstile_mod"
    assert (loaded.config.mod_layers, loaded.config.mod_capacity, loaded.config.mod_threshold,
            loaded.config.mod_coef) == ([0, 2], 0.3, 0.4, 0.2)
    assert all(torch.equal(t, loaded.state_dict()[k]) for k, t in model.state_dict().items())
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tie_embeddings
    ids = torch.randint(3, len(tok), (2, 17))
    with torch.no_grad():  # same weights; copies in other memory may round differently by ~1e-7
        torch.testing.assert_close(model(ids).logits, loaded(ids).logits, rtol=0, atol=1e-6)
    # the PPO critic: the same backbone (routers included) under a zero value head
    critic = build_critic(model)
    assert all(torch.equal(t, critic.model.state_dict()[k]) for k, t in model.model.state_dict().items())
    with torch.no_grad():
        values = critic(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert values.shape == (2, 17, 1) and not values.any()


# -- the embedded engine ---------------------------------------------------------------------------


def _engine(model, mode):
    """decoder: ModDecoder (oneDNN matmuls where they work); linear: ModDecoder on F.linear;
    model: the model's own forward with the engine's KV cache."""
    eng = TorchEngine(model, pad_token_id=0, fast_forward=mode != "model")
    if mode == "linear":
        eng._decoder.onednn, eng._decoder._key = False, None
    return eng


def _greedy(model, prompt, steps=16) -> list[int]:
    """Plain greedy decoding, the whole sequence re-run each token (no cache)."""
    ids, out = torch.tensor([prompt]), []
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(ids).logits[0, -1].argmax())
            out.append(nxt)
            if nxt in STOPS:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


@pytest.mark.parametrize("mode", ["decoder", "linear", "model"])
def test_kv_cached_greedy_with_sessions_equals_the_full_forward(mode):
    model = mod_model(seed=1)
    eng = _engine(model, mode)
    assert isinstance(eng._decoder, ModDecoder) == (mode != "model")
    params = SamplingParams(max_new_tokens=16, temperature=0, stop_token_ids=STOPS)
    prompts = _prompts(8, seed=2)
    reasons = set()
    for turn in range(2):
        out = eng.generate(prompts, params, sessions=range(8))
        for p, c in zip(prompts, out):
            assert c.token_ids == _greedy(model, p)
            reasons.add(c.finish_reason)
        g = torch.Generator().manual_seed(10 + turn)
        prompts = [p + c.token_ids + torch.randint(3, VOCAB, (3,), generator=g).tolist() for p, c in zip(prompts, out)]
    assert reasons == {"stop", "length"}  # rows finished at different steps: the batch was compacted
    assert eng.stats["reused_tokens"] > 0
    # every stored session's cache marks exactly the tokens the full forward skips, per routed layer
    marked = 0
    for key in range(8):
        session = eng._sessions[key]
        with torch.no_grad():
            model(torch.tensor([session.token_ids]))
        skipped = {0: ~(model.model.last_probs[0][0] > 0.5), 2: ~(model.model.last_probs[1][0] > 0.5)}
        for layer, (_, values) in enumerate(session.kv):
            is_marked = values[:, :, 0].eq(SKIPPED_VALUE).all(0)  # [len]: every head marked
            assert torch.equal(is_marked, skipped.get(layer, torch.zeros_like(is_marked)))
            marked += int(is_marked.sum())
    assert marked > 50


def test_the_cache_test_fails_when_skipped_tokens_stay_visible(monkeypatch):
    """The check above has teeth: a decoder that lets queries attend to skipped tokens' cached
    columns (zero keys, marked values) decodes differently from the model."""
    import rollout.decoders.mod as decoder_module

    model = mod_model(seed=1)
    monkeypatch.setattr(decoder_module, "skipped_columns",
                        lambda v: torch.zeros(v.shape[0], v.shape[2], dtype=torch.bool))
    eng = _engine(model, "linear")
    prompts = _prompts(8, seed=2)
    out = eng.generate(prompts, SamplingParams(max_new_tokens=8, temperature=0, stop_token_ids=STOPS))
    assert sum(c.token_ids != _greedy(model, p, 8) for p, c in zip(prompts, out)) >= 4


def test_engine_logprobs_match_the_learners(tmp_path):
    """Two-turn episodes through the runner (sessions): the learner's log-probs equal the engine's
    within 1e-4 (fp32)."""
    from rollout.runner import EpisodeRunner

    tok = tiny_tokenizer()
    policy = mod_model(vocab=len(tok))
    exp = rl_experiment(tmp_path, algo="grpo")
    exp.model = mod_config()
    exp.rollout.max_turn_tokens = 12
    engine = TorchEngine(policy, tok.pad_token_id)
    assert isinstance(engine._decoder, ModDecoder)
    runner = EpisodeRunner.for_env(engine, tok, "toy_two_turn", {}, exp.rollout, 256)
    trajs, _ = runner.play([{"id": "a"}, {"id": "b"}], group_size=3, seed=0)
    runner.close()
    assert all(tr.turns == 2 for tr in trajs)
    learner = Learner(exp, copy.deepcopy(policy), tok.pad_token_id)
    batch = learner.prepare(trajs, fast=False)
    on = batch.mask.bool()
    assert on.sum() >= 40
    assert float((batch.old_logp[on] - batch.behaviour_logp[on]).abs().max()) < 1e-4
    rates = _rates(policy, batch.input_ids[:1, : int(batch.attention_mask[0].sum())])
    assert all(0.1 < r < 0.9 for r in rates), rates  # the episodes did skip tokens


# -- training steps on DeepSpeed -------------------------------------------------------------------


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_one_sft_step_lowers_the_loss(zero_stage):
    from algos.runtime import init_deepspeed
    from algos.sft import sft_loss

    model = mod_model(mixed=False).train()  # a fresh model: every token runs, p ≈ 0.88
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    engine = init_deepspeed(model, optimizer, scheduler, RuntimeConfig(device="cpu", zero_stage=zero_stage), 4, 1, 1.0)
    ids = torch.randint(3, VOCAB, (4, 24), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    loss, stats = sft_loss(engine, batch, 0.01)
    mean_p = float(stats["mod_prob"])
    assert 0.8 < mean_p < 0.95 and float(stats["mod_rate_0"]) == float(stats["mod_rate_2"]) == 1.0
    assert float(stats["capacity_loss"]) == pytest.approx(0.01 * (mean_p - 0.5) ** 2, rel=1e-4)
    torch.testing.assert_close(loss, engine(**batch).loss + stats["capacity_loss"])  # the regulariser is in it
    router = model.model.layers[0].router
    bias_before = float(router.bias.detach())
    engine.backward(loss)
    engine.step()
    with torch.no_grad():
        after, after_stats = sft_loss(engine, batch, 0.01)
    assert float(after) < float(loss.detach())
    assert float(router.bias.detach()) != bias_before  # the routers trained


def _rl_objective(learner, batch) -> float:
    """The policy loss at the learner's current weights (π_old, advantages and TIS from `batch`)
    plus the capacity regulariser: what one update step must lower."""
    with torch.no_grad():
        logits = learner.policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    logp = token_logprobs(logits, batch.input_ids[:, 1:])
    w = loss_weights(batch.mask, "token")
    pg, _ = clipped_policy_loss(logp, batch.old_logp, batch.advantages, w, 0.2, batch.tis_weights)
    return float(pg + auxiliary_losses(learner.policy, batch.attention_mask)[0])


@pytest.mark.parametrize("algo,zero_stage", [("grpo", 0), ("grpo", 2), ("ppo", 0)])
def test_one_rl_step_lowers_the_loss(tmp_path, algo, zero_stage):
    tok = tiny_tokenizer()
    exp = rl_experiment(tmp_path, algo=algo, minibatch_size=8, micro_batch_size=8, lr=1e-3)
    exp.model = mod_config()
    exp.runtime.zero_stage = zero_stage
    learner = Learner(exp, mod_model(vocab=len(tok)).train(), tok.pad_token_id)
    trajs = synthetic_episodes(8)
    batch = learner.prepare(trajs, fast=False)
    before = _rl_objective(learner, batch)
    metrics = learner.update(trajs, seed=0)
    assert metrics["capacity_loss"] > 0 and 0 < metrics["mod_rate_0"] < 1 and 0 < metrics["mod_rate_2"] < 1
    assert _rl_objective(learner, batch) < before
    if algo == "ppo":
        assert metrics["value_loss"] > 0


def test_bf16_engine_matches_the_fp32_model_on_most_tokens():
    """bf16 rollout: routing is decided in fp32 from bf16 states; near-threshold tokens may flip,
    the greedy tokens stay mostly the same."""
    model = mod_model(seed=1)
    eng = TorchEngine(copy.deepcopy(model), pad_token_id=0, dtype=torch.bfloat16, compile_attention=False)
    prompts = _prompts(8, seed=3)
    out = eng.generate(prompts, SamplingParams(max_new_tokens=4, temperature=0))
    same = sum(c.token_ids[0] == _greedy(model, p, 1)[0] for p, c in zip(prompts, out))
    assert same >= 6
