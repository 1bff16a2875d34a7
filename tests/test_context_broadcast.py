"""`model.context_broadcast` (agents/broadcast.py): each attention head adds the mean of the values
over the keys it may attend to. The term against hand-computed means (padding, mod's skipped
tokens, routed attention's unrouted keys), causality, save/load, the engine's decoders (KV cache,
sessions, segments, log-probs) for several archs, one SFT step on DeepSpeed, flag off == the plain
model bit for bit, and the named config errors."""
from __future__ import annotations

import copy

import pytest
import torch
from rl_helpers import rl_experiment, tiny_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import agents.broadcast as broadcast
from agents.broadcast import TurnstileLlamaForCausalLM, add_uniform, uniform_weights
from agents.model import ModelConfig, build_model, load_pretrained
from algos.config import ConfigError, RuntimeConfig, load_config
from rollout.decoders import decoder_for
from rollout.engine import SamplingParams, TorchEngine

VOCAB = 300
STOPS = tuple(range(3, VOCAB, 11))
ARCHS = {  # each arch's own keys: small enough that prompts of a few dozen tokens exercise them
    "llama": {},
    "mod": {"num_layers": 3, "mod_layers": [0, 2]},
    "routed_attention": {"region_size": 4, "top_regions": 2, "local_conv": 3},
    "monarch": {"monarch_attention": True},
    "factor": {},
}


def cb_config(arch: str = "llama", **kw) -> ModelConfig:
    return ModelConfig(**{"arch": arch, "hidden_size": 64, "num_layers": 2, "num_heads": 2, "max_seq_len": 256,
                          "context_broadcast": True, **ARCHS[arch], **kw})


def cb_model(arch: str = "llama", seed: int = 0, vocab: int = VOCAB, **kw):
    """A tiny policy with the flag on and its projections × 3 (at the init's scale attention is
    near uniform and greedy decoding repeats a token whatever the prompt); mod's routers random
    and unbiased, so about half the tokens skip each routed layer."""
    torch.manual_seed(seed)
    model = build_model(cb_config(arch, **kw), vocab, 0, 1, 2).eval()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.weight") or name.endswith("proj.L"):
                p.mul_(3.0)
        for layer in model.model.layers:
            if getattr(layer, "router", None) is not None:
                layer.router.weight.copy_(0.3 * torch.randn(layer.router.weight.shape, generator=g))
                layer.router.bias.zero_()
    return model


def flag_off_twin(model):
    """The same weights with context_broadcast off (llama: the plain LlamaForCausalLM)."""
    if isinstance(model, TurnstileLlamaForCausalLM):
        own = ("context_broadcast", "model_type", "architectures", "transformers_version")
        twin = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in model.config.to_dict().items() if k not in own}))
    else:
        cfg = copy.deepcopy(model.config)
        cfg.context_broadcast = False
        twin = type(model)(cfg)
    twin.load_state_dict(model.state_dict(), strict=True)
    return twin.eval()


def _prompts(n, seed=0, max_len=30):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len, (n,), generator=g)
    return [torch.randint(3, VOCAB, (int(k),), generator=g).tolist() for k in lengths]


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


def _left_padded(seed=0):
    """Two rows of 14 columns: row 0 all real, row 1 five padding columns (random tokens there, so
    their values are not zero) then 9 real tokens. Returns ids, attention mask, position ids."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, 14), generator=g)
    am = torch.ones_like(ids)
    am[1, :5] = 0
    return ids, am, (am.cumsum(-1) - 1).clamp(min=0)


# -- the term ----------------------------------------------------------------------------------------


def test_uniform_term_on_numbers_by_hand():
    # one row, one head, D = 1; column 0 is padding (value 100), columns 1..3 hold 2, 4, 6
    values = torch.tensor([100.0, 2.0, 4.0, 6.0]).view(1, 1, 4, 1)
    cols = torch.arange(4)
    allowed = (cols <= cols[:, None]) & (cols > 0)  # causal, padding out; row 0 (a pad query) is empty
    out = add_uniform(torch.zeros(1, 1, 4, 1), uniform_weights(allowed[None, None], torch.float32), values)
    assert out.flatten().tolist() == [0.0, 2.0, 3.0, 4.0]  # an empty row adds 0; (2 + 4) / 2; (2 + 4 + 6) / 3
    # grouped-query attention: both query heads of the one key/value head add its mean, to their own output
    o = torch.tensor([[10.0], [20.0]]).view(1, 2, 1, 1).expand(1, 2, 4, 1).contiguous()
    out = add_uniform(o, uniform_weights(allowed[None, None], torch.float32), values)
    assert out[0, :, :, 0].tolist() == [[10.0, 12.0, 13.0, 14.0], [20.0, 22.0, 23.0, 24.0]]
    # bf16: the count is taken in fp32 (bf16 holds 257 as 256)
    many = torch.ones(1, 1, 1, 257, dtype=torch.bool)
    assert uniform_weights(many, torch.bfloat16).float().sum() == pytest.approx(1.0, abs=4e-3)


def _o_proj_inputs(model, *args, **kw) -> torch.Tensor:
    """What layer 0's output projection reads in a forward (mod: the routed tokens only, [r, H D])."""
    seen = []
    hook = model.model.layers[0].self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        with torch.no_grad():
            model(*args, **kw)
    finally:
        hook.remove()
    return seen[0]


@pytest.mark.parametrize("arch", ["llama", "mod", "routed_attention"])
def test_attention_adds_the_hand_computed_mean_over_the_allowed_keys(arch):
    """Layer 0's attention output = the flag-off attention (softmax, and routed attention's
    routing and LePE) + the mean of the values over: the real keys at positions ≤ the query's
    (padding excluded); mod: less the keys of tokens that skip the layer; routed_attention: all of
    them, routed or not. By hand from layer 0's value projection, per query."""
    model = cb_model(arch, num_kv_heads=1)
    twin = flag_off_twin(model)
    ids, am, pos = _left_padded()
    got = _o_proj_inputs(model, ids, attention_mask=am, position_ids=pos)
    base = _o_proj_inputs(twin, ids, attention_mask=am, position_ids=pos)
    layer, cfg = model.model.layers[0], model.config
    H, D = cfg.num_attention_heads, cfg.head_dim
    with torch.no_grad():
        v = layer.self_attn.v_proj(layer.input_layernorm(model.model.embed_tokens(ids)))  # [2, 14, KV D], KV = 1
    runs = torch.ones(2, 14, dtype=torch.bool)
    if arch == "mod":
        runs = model.model.last_probs[0] > cfg.mod_threshold
        assert 0 < runs[am.bool()].float().mean() < 1  # both kinds of token
    expected, rows = [], []
    for b in range(2):
        for t in range(14):
            if not am[b, t] or not runs[b, t]:
                continue  # padding queries' outputs are never read; a skipped query's is dropped
            keys = [s for s in range(t + 1) if am[b, s] and runs[b, s]]
            expected.append(v[b, keys].mean(0).repeat(H))  # each query head adds its (only) KV head's mean
            rows.append(b * 14 + t)
    expected = torch.stack(expected)
    if arch == "mod":  # o_proj reads the routed tokens of the 2 x 14 grid, in order
        routed = runs.flatten().nonzero().squeeze(1).tolist()
        at = [routed.index(r) for r in rows]
        torch.testing.assert_close(got[at] - base[at], expected, rtol=0, atol=1e-5)
    else:
        torch.testing.assert_close((got - base).view(28, H * D)[rows], expected, rtol=0, atol=1e-5)
    assert expected.abs().mean() > 0.05


def test_llama_attention_is_softmax_plus_the_mean_written_out():
    """The whole of layer 0's attention, by hand: softmax(q K^T / √D) V + mean(V) over the real
    keys at positions ≤ the query's, with grouped-query attention (2 query heads, 1 KV head)."""
    model = cb_model("llama", num_kv_heads=1)
    ids, am, pos = _left_padded()
    got = _o_proj_inputs(model, ids, attention_mask=am, position_ids=pos).view(2, 14, 2, 32)
    inner, attn = model.model, model.model.layers[0].self_attn
    with torch.no_grad():
        x = inner.embed_tokens(ids)
        h = model.model.layers[0].input_layernorm(x)
        q, k, v = (attn.q_proj(h).view(2, 14, 2, 32).transpose(1, 2), attn.k_proj(h).view(2, 14, 1, 32).transpose(1, 2),
                   attn.v_proj(h).view(2, 14, 1, 32).transpose(1, 2))
        cos, sin = inner.rotary_emb(x, pos)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
    for b in range(2):
        for t in range(14):
            if not am[b, t]:
                continue
            keys = [s for s in range(t + 1) if am[b, s]]
            for head in range(2):
                p = torch.softmax(k[b, 0, keys] @ q[b, head, t] * attn.scaling, dim=0)  # [S]
                want = p @ v[b, 0, keys] + v[b, 0, keys].mean(0)
                torch.testing.assert_close(got[b, t, head], want, rtol=0, atol=1e-5)
    # padding excluded: the padded row's real tokens get the logits of the row alone
    with torch.no_grad():
        padded = model(ids, attention_mask=am, position_ids=pos).logits[1, 5:]
        torch.testing.assert_close(padded, model(ids[1:, 5:]).logits[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "mod", "routed_attention"])
def test_future_tokens_never_change_past_outputs(arch):
    model = cb_model(arch)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 24), generator=g)
    with torch.no_grad():
        before = model(ids).logits
        for t in (0, 7, 15):
            changed = ids.clone()
            changed[:, t + 1 :] = torch.randint(3, VOCAB, changed[:, t + 1 :].shape, generator=g)
            after = model(changed).logits
            torch.testing.assert_close(after[:, : t + 1], before[:, : t + 1], rtol=0, atol=1e-5)
            assert (after[:, t + 1 :] - before[:, t + 1 :]).abs().max() > 1e-2  # the future did change


# -- flag off, config, save/load -----------------------------------------------------------------------


def test_flag_off_is_the_plain_model_bit_for_bit(monkeypatch):
    torch.manual_seed(0)
    plain = build_model(ModelConfig(hidden_size=64, num_layers=2, num_heads=2), VOCAB, 0, 1, 2)
    assert type(plain) is LlamaForCausalLM and plain.config.model_type == "llama"  # what vLLM serves
    assert not ModelConfig().context_broadcast
    ids = torch.randint(3, VOCAB, (2, 12))
    # a turnstile_llama with the flag off in its config is the Llama, bit for bit
    cfg = broadcast.TurnstileLlamaConfig(**{k: v for k, v in plain.config.to_dict().items()
                                            if k not in ("model_type", "architectures", "transformers_version")})
    off = TurnstileLlamaForCausalLM(cfg).eval()
    off.load_state_dict(plain.state_dict())
    with torch.no_grad():
        assert torch.equal(off(ids).logits, plain.eval()(ids).logits)
    # the broadcast attention minus its term is Llama's (Monarch's) attention, bit for bit, in the
    # model and in the engine's decoder
    monkeypatch.setattr(broadcast, "add_uniform", lambda o, w, v: o)
    import rollout.decoders.llama as llama_decoder

    monkeypatch.setattr(llama_decoder, "add_uniform", lambda o, w, v: o)
    for arch in ("llama", "monarch", "factor"):
        model = cb_model(arch)
        twin = flag_off_twin(model)
        with torch.no_grad():
            assert torch.equal(model(ids).logits, twin(ids).logits), arch
        dec, dec_twin = decoder_for(model), decoder_for(twin)
        assert dec.context_broadcast and not dec_twin.context_broadcast
        dec.refresh()
        dec_twin.refresh()
        mask = torch.zeros(2, 1, 12, 12).masked_fill(~torch.ones(12, 12, dtype=torch.bool).tril(), float("-inf"))
        from rollout.kv_cache import GrowingCache

        pos = torch.arange(12).expand(2, 12)
        with torch.no_grad():
            a = dec(ids, pos, GrowingCache(model.config.num_hidden_layers, capacity=12).layers, mask)
            b = dec_twin(ids, pos, GrowingCache(model.config.num_hidden_layers, capacity=12).layers, mask)
        assert torch.equal(a, b), arch


def test_named_config_errors(tiny_recipe):
    assert not load_config(tiny_recipe).model.context_broadcast
    assert load_config(tiny_recipe, ["+model.context_broadcast=true"]).model.context_broadcast
    with pytest.raises(ConfigError, match=r"model.context_broadcast does not apply to model.arch=moe: .*Qwen2-MoE"):
        load_config(tiny_recipe, ["model.arch=moe", "+model.context_broadcast=true"])
    with pytest.raises(ConfigError, match=r"rollout.backend=vllm cannot serve model.context_broadcast=true"):
        load_config(tiny_recipe, ["+model.context_broadcast=true", "rollout.backend=vllm"])
    with pytest.raises(ConfigError, match=r"rollout.backend=vllm cannot serve model.arch=mod"):  # the arch's own first
        load_config(tiny_recipe, ["model.arch=mod", "+model.mod_layers=[1]", "+model.context_broadcast=true",
                                  "rollout.backend=vllm"])
    load_config(tiny_recipe, ["model.arch=moe", "rollout.backend=vllm"])  # moe without the flag: served as before


@pytest.mark.parametrize("arch", list(ARCHS))
def test_save_pretrained_round_trip_keeps_the_flag_and_the_logits(tmp_path, arch):
    from algos.learner import build_critic

    tok = tiny_tokenizer()
    model = cb_model(arch, vocab=len(tok))
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, _ = load_pretrained(tmp_path)
    assert type(loaded) is type(model) and loaded.config.context_broadcast is True
    assert type(loaded.model.layers[0].self_attn) is type(model.model.layers[0].self_attn)
    ids = torch.randint(3, len(tok), (2, 17))
    with torch.no_grad():
        logits = model(ids).logits
        torch.testing.assert_close(loaded(ids).logits, logits, rtol=0, atol=1e-6)
        assert (flag_off_twin(loaded)(ids).logits - logits).abs().max() > 1e-2  # the flag is what differs
    if arch == "llama":  # the PPO critic of a turnstile_llama: the same backbone under a zero head
        critic = build_critic(model)
        assert all(torch.equal(t, critic.model.state_dict()[k]) for k, t in model.model.state_dict().items())
        assert type(critic.model.layers[0].self_attn) is broadcast.BroadcastLlamaAttention


# -- the embedded engine ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,mode", [("llama", "decoder"), ("llama", "model"), ("mod", "decoder"),
                                       ("routed_attention", "decoder"), ("monarch", "decoder"),
                                       ("factor", "decoder")])
def test_kv_cached_greedy_with_sessions_equals_uncached_decoding(arch, mode):
    """decoder: the arch's cached forward (F.linear); model: the model's own forward with the engine's cache."""
    model = cb_model(arch, seed=1, num_kv_heads=1)
    eng = TorchEngine(model, pad_token_id=0, fast_forward=mode != "model")
    if mode == "decoder":
        assert eng._decoder.context_broadcast
        eng._decoder.onednn, eng._decoder._key = False, None
    params = SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=STOPS)
    prompts = _prompts(6, seed=2)
    twin = flag_off_twin(model)
    reasons, differ = set(), 0
    for turn in range(2):
        out = eng.generate(prompts, params, sessions=range(6))
        for p, c in zip(prompts, out):
            assert c.token_ids == _greedy(model, p, 12)
            reasons.add(c.finish_reason)
            differ += c.token_ids != _greedy(twin, p, 12)
        g = torch.Generator().manual_seed(10 + turn)
        prompts = [p + c.token_ids + torch.randint(3, VOCAB, (3,), generator=g).tolist() for p, c in zip(prompts, out)]
    assert reasons == {"stop", "length"}  # rows finished at different steps: the batch was compacted
    assert eng.stats["reused_tokens"] > 0
    assert differ >= 2  # the broadcast decides tokens: a decoder that dropped it would fail above


def test_decoder_with_segments_equals_the_model_on_a_left_padded_batch():
    """Prefill of rows of different lengths (left-padded), then decode steps whose attention runs
    in row groups reading the cache from each group's first column (the engine's segments), against
    the model's forward on each whole sequence."""
    from rollout.kv_cache import GrowingCache

    model = cb_model("llama", seed=3)
    dec = decoder_for(model)
    dec.onednn = False
    dec.refresh()
    seqs = [torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (23, 9)]
    S = max(map(len, seqs))
    ids = torch.tensor([[0] * (S - len(s)) + s for s in seqs])
    valid = torch.tensor([[False] * (S - len(s)) + [True] * len(s) for s in seqs])
    pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
    cols = torch.arange(S)
    allowed = (valid[:, None, None, :] & (cols <= cols[:, None])) | (cols == cols[:, None])
    cache = GrowingCache(2, capacity=S + 3)
    segments = [(0, 1, 0), (1, 2, S - len(seqs[1]))]
    with torch.no_grad():
        logits = dec(ids, pos, cache.layers, torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf")))
        for step in range(3):
            ref = torch.stack([model(torch.tensor([s])).logits[0, -1] for s in seqs])
            torch.testing.assert_close(logits, ref, rtol=0, atol=1e-4)
            nxt = logits.argmax(-1)
            seqs = [s + [int(t)] for s, t in zip(seqs, nxt)]
            valid = torch.cat([valid, torch.ones(2, 1, dtype=torch.bool)], dim=1)
            mask = torch.zeros(valid.shape).masked_fill(~valid, float("-inf"))[:, None, None, :]
            logits = dec(nxt[:, None], torch.tensor([[len(s) - 1] for s in seqs]), cache.layers, mask,
                         segments if step % 2 == 0 else None)


@pytest.mark.parametrize("arch", ["llama", "mod", "routed_attention"])
def test_engine_logprobs_match_the_learners(tmp_path, arch):
    """Two-turn episodes through the runner (sessions): the learner's log-probs equal the engine's
    within 1e-4 (fp32)."""
    from algos.learner import Learner
    from rollout.runner import EpisodeRunner

    tok = tiny_tokenizer()
    policy = cb_model(arch, vocab=len(tok))
    exp = rl_experiment(tmp_path, algo="grpo")
    exp.model = cb_config(arch)
    exp.rollout.max_turn_tokens = 12
    engine = TorchEngine(policy, tok.pad_token_id)
    assert engine._decoder.context_broadcast
    runner = EpisodeRunner.for_env(engine, tok, "toy_two_turn", {}, exp.rollout, 256)
    trajs, _ = runner.play([{"id": "a"}, {"id": "b"}], group_size=3, seed=0)
    runner.close()
    assert all(tr.turns == 2 for tr in trajs)
    batch = Learner(exp, copy.deepcopy(policy), tok.pad_token_id).prepare(trajs, fast=False)
    on = batch.mask.bool()
    assert on.sum() >= 40
    assert float((batch.old_logp[on] - batch.behaviour_logp[on]).abs().max()) < 1e-4


# -- training -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,zero_stage", [("llama", 0), ("mod", 2)])
def test_one_sft_step_lowers_the_loss(arch, zero_stage):
    from algos.runtime import init_deepspeed
    from algos.sft import sft_loss

    model = cb_model(arch).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    engine = init_deepspeed(model, optimizer, scheduler, RuntimeConfig(device="cpu", zero_stage=zero_stage), 4, 1, 1.0)
    ids = torch.randint(3, VOCAB, (4, 24), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    loss, _ = sft_loss(engine, batch, 0.01)
    engine.backward(loss)
    engine.step()
    with torch.no_grad():
        after, _ = sft_loss(engine, batch, 0.01)
    assert float(after) < float(loss.detach())
