"""The `routed_attention` backbone (BiFormer's bi-level routing attention, 1-D and causal): config
keys, the attention against a per-query reference, dense equality, causality, padding, save/load
and the critic, the engine's decoder (KV cache, sessions, log-probs), and one SFT and one RL step
on DeepSpeed."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from rl_helpers import rl_experiment, tiny_tokenizer
from test_learner import synthetic_episodes

from agents.model import ModelConfig, build_model
from agents.routed_attention import keys_per_query, parameter_counts, plan_routing, route
from algos.config import ConfigError, RuntimeConfig, load_config
from algos.learner import Learner, build_critic
from algos.losses import clipped_policy_loss, loss_weights, token_logprobs
from rollout.decoders import DECODERS, decoder_for
from rollout.decoders.routed_attention import RoutedAttentionDecoder
from rollout.engine import SamplingParams, TorchEngine

VOCAB = 300
STOPS = tuple(range(3, VOCAB, 11))
# small regions and k so that prompts of a few dozen tokens have past regions the router drops
ROUTED = {"region_size": 4, "top_regions": 2, "local_conv": 3}


def ra_config(**kw) -> ModelConfig:
    return ModelConfig(**{"arch": "routed_attention", "hidden_size": 64, "num_layers": 2, "num_heads": 2,
                          "max_seq_len": 256, **ROUTED, **kw})


def ra_model(seed: int = 0, vocab: int = VOCAB, lepe_std: float = 0.3, **kw):
    """A tiny routed-attention policy with weights larger than the init's: projections × 3 (at
    the init's scale attention is near uniform and greedy decoding repeats one token whatever
    the prompt, which would test little), LePE's drawn large enough to matter next to attention."""
    torch.manual_seed(seed)
    model = build_model(ra_config(**kw), vocab, 0, 1, 2).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p.mul_(3.0)
        for layer in model.model.layers:
            if layer.self_attn.lepe is not None:
                layer.self_attn.lepe.weight.normal_(0, lepe_std)
                layer.self_attn.lepe.bias.normal_(0, 0.02)  # a constant shift of every output: keep it small
    return model


def dense_twin(model):
    """A plain LlamaForCausalLM with the routed model's weights (it must have local_conv: 0)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    own = ("region_size", "top_regions", "local_conv", "model_type", "architectures", "transformers_version")
    cfg = LlamaConfig(**{k: v for k, v in model.config.to_dict().items() if k not in own})
    llama = LlamaForCausalLM(cfg).eval()
    llama.load_state_dict(model.state_dict(), strict=True)
    return llama


def _prompts(n, seed=0, max_len=30):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len, (n,), generator=g)
    return [torch.randint(3, VOCAB, (int(k),), generator=g).tolist() for k in lengths]


# -- config ----------------------------------------------------------------------------------------


def test_keys_defaults_and_named_errors(tiny_recipe):
    m = load_config(tiny_recipe, ["model.arch=routed_attention"]).model
    assert (m.region_size, m.top_regions, m.local_conv) == (16, 4, 3)
    assert load_config(tiny_recipe).model.region_size is None  # a llama section leaves them unset
    with pytest.raises(ConfigError, match=r"model.region_size applies to model.arch=routed_attention only"):
        load_config(tiny_recipe, ["+model.region_size=8"])
    with pytest.raises(ConfigError, match=r"model.region_size=512 is not below model.max_seq_len=512"):
        load_config(tiny_recipe, ["model.arch=routed_attention", "+model.region_size=512"])
    with pytest.raises(ConfigError, match=r"top_regions"):
        load_config(tiny_recipe, ["model.arch=routed_attention", "+model.top_regions=0"])
    with pytest.raises(ConfigError, match=r"local_conv"):
        load_config(tiny_recipe, ["model.arch=routed_attention", "+model.local_conv=-1"])
    with pytest.raises(ConfigError, match=r"rollout.backend=vllm cannot serve model.arch=routed_attention"):
        load_config(tiny_recipe, ["model.arch=routed_attention", "rollout.backend=vllm"])
    model = build_model(load_config(tiny_recipe, ["model.arch=routed_attention"]).model, 320, 0, 1, 2)
    assert (model.config.region_size, model.config.top_regions, model.config.local_conv) == (16, 4, 3)


# -- the attention ---------------------------------------------------------------------------------


def _reference_attention(attn, x, rotary, R, k_top):
    """Routed attention of one unpadded sequence x [L, C], by the definition, one query at a time:
    region means of the post-RoPE keys, Σ over the KV head's query heads of q · k̄ over completed
    past regions, top-k, softmax over the own region (causal) + the chosen regions, LePE as a
    left-zero-padded depthwise conv (F.conv1d)."""
    L = x.shape[0]
    H, KV, D = attn.config.num_attention_heads, attn.config.num_key_value_heads, attn.head_dim
    G = H // KV
    q = attn.q_proj(x).view(L, H, D).transpose(0, 1)  # [H, L, D]
    k = attn.k_proj(x).view(L, KV, D).transpose(0, 1)
    v = attn.v_proj(x).view(L, KV, D).transpose(0, 1)
    cos, sin = rotary(x[None], torch.arange(L)[None])
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q, k = apply_rotary_pos_emb(q[None], k[None], cos, sin)
    q, k = q[0], k[0]
    out = torch.zeros(H, L, D)
    kept = 0
    for g in range(KV):
        for p in range(L):
            own = p // R
            means = [k[g, r * R : (r + 1) * R].mean(0) for r in range(own)]
            scores = [sum(float(q[h, p] @ m) for h in range(g * G, (g + 1) * G)) for m in means]
            chosen = sorted(range(own), key=lambda r: (-scores[r], -r))[:k_top]  # ties: the most recent
            cols = [j for j in range(p + 1) if j // R == own or j // R in chosen]
            kept += len(cols)
            for h in range(g * G, (g + 1) * G):
                w = torch.softmax(k[g, cols] @ q[h, p] * attn.scaling, 0)
                out[h, p] = w @ v[g, cols]
    if attn.lepe is not None:
        K = attn.lepe.kernel_size[0]
        channels = v.transpose(1, 2).reshape(KV * D, L)  # [KV D, L], channel kv D + d
        conv = F.conv1d(F.pad(channels[None], (K - 1, 0)), attn.lepe.weight, attn.lepe.bias, groups=KV * D)[0]
        out = out + conv.view(KV, D, L).transpose(1, 2).repeat_interleave(G, dim=0)
    return attn.o_proj(out.transpose(0, 1).reshape(L, H * D)), kept


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_attention_equals_the_per_query_definition(kv_heads):
    model = ra_model(num_kv_heads=kv_heads)
    attn = model.model.layers[0].self_attn
    L, R, k_top = 23, 4, 2  # 5 complete regions and a partial one: queries past region 2 drop some
    x = torch.randn(L, 64, generator=torch.Generator().manual_seed(1))
    pos = torch.arange(L)[None]
    plan = plan_routing(torch.ones(1, L, dtype=torch.bool), pos, R, 3)
    with torch.no_grad():
        got, _ = attn(x[None], position_embeddings=model.model.rotary_emb(x[None], pos), routing_plan=plan)
        ref, kept = _reference_attention(attn, x, model.model.rotary_emb, R, k_top)
    torch.testing.assert_close(got[0], ref, rtol=1e-5, atol=1e-5)
    # the router dropped keys: fewer than causal attention's L (L + 1) / 2 per query and head group
    assert kept / kv_heads < L * (L + 1) / 2 - 20
    assert kept / (kv_heads * L) == keys_per_query(L, R, k_top)[1]


def test_keys_per_query_counts_what_the_mask_keeps():
    L, R, k_top = 200, 16, 4
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, L, 32, generator=g), torch.randn(1, 2, L, 32, generator=g)
    plan = plan_routing(torch.ones(1, L, dtype=torch.bool), torch.arange(L)[None], R, 0)
    kept = int((route(q, k, plan, k_top) & plan.causal[:, None]).sum())  # over 2 KV heads x L queries
    dense, routed = keys_per_query(L, R, k_top)
    assert kept == round(routed * 2 * L) and dense == (L + 1) / 2
    assert keys_per_query(1024, 16, 4) == (512.5, 70.0)  # 7.3x fewer (docs/backbones.md)


def test_ties_go_to_the_most_recent_regions():
    """A zero query (the pad id's zero embedding, which a policy can sample) ties every region: it
    keeps the k most recent, whatever the batch shape (topk's order among ties would not be)."""
    L, R = 30, 4
    k = torch.randn(3, 1, L, 32, generator=torch.Generator().manual_seed(0))
    plan = plan_routing(torch.ones(3, L, dtype=torch.bool), torch.arange(L).expand(3, L), R, 0)
    keep = route(torch.zeros(3, 2, L, 32), k, plan, 2)[:, 0] & plan.causal  # [3, L, L]
    for p in range(L):
        regions = {j // R for j in range(L) if keep[0, p, j]}
        assert regions == {p // R, p // R - 1, p // R - 2} - {-1, -2}, p
    assert torch.equal(keep[1], keep[0]) and torch.equal(keep[2], keep[0])


def test_equals_dense_llama_when_top_regions_cover_every_past_region():
    ids = torch.randint(3, VOCAB, (3, 40), generator=torch.Generator().manual_seed(0))
    am = torch.ones_like(ids)
    am[1, 30:] = 0  # right padding, as the learner pads
    full = ra_model(local_conv=0, top_regions=10)  # 40 tokens: at most 9 past regions of 4
    routed = ra_model(local_conv=0)  # the same weights, k = 2
    llama = dense_twin(full)
    with torch.no_grad():
        dense = llama(ids, attention_mask=am).logits
        real = am.bool()  # (padding's own outputs are whatever each model leaves there)
        torch.testing.assert_close(full(ids, attention_mask=am).logits[real], dense[real], rtol=0, atol=1e-5)
        # with k = 2 the queries past region 2 attend to fewer keys: their outputs differ
        gap = (routed(ids, attention_mask=am).logits - dense).abs().amax(-1)  # [3, 40]
    assert float(gap[:, :12].max()) < 1e-5  # regions 0..2: every past region is still chosen
    assert float(gap[0, 12:].min()) > 1e-4


def test_future_tokens_never_change_past_outputs():
    model = ra_model()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (1, 48), generator=g)
    with torch.no_grad():
        base = model(ids).logits[0]
        for cut in (5, 17, 32):  # mid-region cuts: a later token of the same region changes nothing before it
            other = ids.clone()
            other[0, cut:] = torch.randint(3, VOCAB, (48 - cut,), generator=g)
            changed = model(other).logits[0]
            torch.testing.assert_close(changed[:cut], base[:cut], rtol=0, atol=1e-6)
            assert float((changed[cut:] - base[cut:]).abs().max()) > 1e-3


def test_padding_and_position_ids_give_each_row_its_own_outputs():
    """Left padding with position ids (what the engine's fallback and transformers' generate
    pass) and right padding (the learner's) both give every real token its unpadded output."""
    model = ra_model(num_kv_heads=1)
    seqs = [torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(n)) for n in (33, 18, 7)]
    with torch.no_grad():
        alone = [model(s[None]).logits[0] for s in seqs]
        L = 33
        left = torch.zeros(3, L, dtype=torch.long)
        right = torch.zeros(3, L, dtype=torch.long)
        lam, ram = torch.zeros_like(left), torch.zeros_like(right)
        for i, s in enumerate(seqs):
            left[i, L - len(s) :], lam[i, L - len(s) :] = s, 1
            right[i, : len(s)], ram[i, : len(s)] = s, 1
        pos = (lam.cumsum(-1) - 1).clamp(min=0)
        lo = model(left, attention_mask=lam, position_ids=pos).logits
        ro = model(right, attention_mask=ram).logits
    for i, s in enumerate(seqs):
        torch.testing.assert_close(lo[i, L - len(s) :], alone[i], rtol=0, atol=1e-5)
        torch.testing.assert_close(ro[i, : len(s)], alone[i], rtol=0, atol=1e-5)


# -- save / load, the critic -----------------------------------------------------------------------


def test_save_pretrained_round_trip_and_the_critic(tmp_path):
    from transformers import AutoModelForCausalLM

    from agents.routed_attention import RoutedAttentionForTokenClassification, RoutedAttentionModel

    model = ra_model(region_size=8, top_regions=3)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(loaded) is type(model)
    assert (loaded.config.region_size, loaded.config.top_regions, loaded.config.local_conv) == (8, 3, 3)
    assert set(loaded.state_dict()) == set(model.state_dict())
    assert all(torch.equal(t, loaded.state_dict()[k]) for k, t in model.state_dict().items())
    ids = torch.randint(3, VOCAB, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, loaded(ids).logits, rtol=0, atol=0)
    # the PPO critic: the same backbone class with the policy's weights and a zero value head
    critic = build_critic(model)
    assert isinstance(critic, RoutedAttentionForTokenClassification) and isinstance(critic.model, RoutedAttentionModel)
    assert all(torch.equal(t, critic.model.state_dict()[k]) for k, t in model.model.state_dict().items())
    with torch.no_grad():
        values = critic(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert values.shape == (2, 40, 1) and float(values.abs().max()) == 0.0
    assert parameter_counts(model)[0] == parameter_counts(model)[1] == sum(p.numel() for p in model.parameters())


# -- the embedded engine ---------------------------------------------------------------------------


def _engine(model, mode):
    """decoder: RoutedAttentionDecoder (oneDNN matmuls where they work); linear: the decoder on
    F.linear; model: the model's own forward with the engine's KV cache."""
    eng = TorchEngine(model, pad_token_id=0, fast_forward=mode != "model")
    if mode == "linear":
        eng._decoder.onednn, eng._decoder._key = False, None
    return eng


@pytest.mark.parametrize("mode", ["decoder", "linear", "model"])
def test_kv_cached_greedy_with_sessions_equals_uncached_decoding(mode):
    model = ra_model(seed=1, num_kv_heads=1)
    eng = _engine(model, mode)
    assert isinstance(eng._decoder, RoutedAttentionDecoder) == (mode != "model")
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
    assert max(len(p) for p in prompts) > 40  # the second turn's prompts span past regions the router drops


def test_decoder_logits_equal_the_models_on_a_left_padded_batch_with_a_cache():
    """One prefill (rows of different lengths, left-padded) and three decode steps through the
    decoder with a KV cache against the model's forward on each whole sequence."""
    from rollout.kv_cache import GrowingCache

    model = ra_model(seed=3)
    assert type(decoder_for(model)) is RoutedAttentionDecoder and RoutedAttentionDecoder in DECODERS
    dec = decoder_for(model)
    dec.refresh()
    seqs = [torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (37, 22, 9)]
    S = max(map(len, seqs))
    ids = torch.tensor([[0] * (S - len(s)) + s for s in seqs])
    valid = torch.tensor([[False] * (S - len(s)) + [True] * len(s) for s in seqs])
    pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
    cols = torch.arange(S)
    allowed = (valid[:, None, None, :] & (cols <= cols[:, None])) | (cols == cols[:, None])  # [n, 1, S, S]
    cache = GrowingCache(2, capacity=S + 3)
    with torch.no_grad():
        logits = dec(ids, pos, cache.layers, torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf")))
        for _ in range(3):
            ref = torch.stack([model(torch.tensor([s])).logits[0, -1] for s in seqs])
            torch.testing.assert_close(logits, ref, rtol=0, atol=1e-4)
            nxt = logits.argmax(-1)
            seqs = [s + [int(t)] for s, t in zip(seqs, nxt)]
            valid = torch.cat([valid, torch.ones(3, 1, dtype=torch.bool)], dim=1)
            mask = torch.zeros(valid.shape).masked_fill(~valid, float("-inf"))[:, None, None, :]
            logits = dec(nxt[:, None], torch.tensor([[len(s) - 1] for s in seqs]), cache.layers, mask)


def test_engine_logprobs_match_the_learners(tmp_path):
    """Two-turn episodes through the runner (sessions): the learner's log-probs equal the engine's within 1e-4."""
    from rollout.runner import EpisodeRunner

    tok = tiny_tokenizer()
    policy = ra_model(vocab=len(tok))
    exp = rl_experiment(tmp_path, algo="grpo")
    exp.model = ra_config()
    exp.rollout.max_turn_tokens = 12
    runner = EpisodeRunner.for_env(TorchEngine(policy, tok.pad_token_id), tok, "toy_two_turn", {}, exp.rollout, 256)
    trajs, _ = runner.play([{"id": "a"}, {"id": "b"}], group_size=3, seed=0)
    runner.close()
    assert all(tr.turns == 2 for tr in trajs)
    assert max(len(tr.token_ids) for tr in trajs) > 24  # the router dropped past regions (R 4, k 2)
    batch = Learner(exp, copy.deepcopy(policy), tok.pad_token_id).prepare(trajs, fast=False)
    on = batch.mask.bool()
    assert on.sum() >= 40
    assert float((batch.old_logp[on] - batch.behaviour_logp[on]).abs().max()) < 1e-4


# -- training steps on DeepSpeed -------------------------------------------------------------------


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_one_sft_step_lowers_the_loss(zero_stage):
    from algos.runtime import init_deepspeed
    from algos.sft import sft_loss

    model = ra_model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    engine = init_deepspeed(model, optimizer, scheduler, RuntimeConfig(device="cpu", zero_stage=zero_stage), 4, 1, 1.0)
    ids = torch.randint(3, VOCAB, (4, 24), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    loss, _ = sft_loss(engine, batch, 0.01)
    engine.backward(loss)
    lepe = model.model.layers[0].self_attn.lepe
    before = lepe.weight.detach().clone()
    engine.step()
    assert not torch.equal(lepe.weight.detach(), before)  # LePE gets a gradient and trains
    with torch.no_grad():
        after, _ = sft_loss(engine, batch, 0.01)
    assert float(after) < float(loss.detach())


def _rl_objective(learner, batch) -> float:
    """The policy loss at the learner's current weights (π_old, advantages and TIS from `batch`)."""
    with torch.no_grad():
        logits = learner.policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    logp = token_logprobs(logits, batch.input_ids[:, 1:])
    w = loss_weights(batch.mask, "token")
    pg, _ = clipped_policy_loss(logp, batch.old_logp, batch.advantages, w, 0.2, batch.tis_weights)
    return float(pg)


@pytest.mark.parametrize("algo,zero_stage", [("grpo", 0), ("grpo", 2), ("ppo", 0)])
def test_one_rl_step_lowers_the_loss(tmp_path, algo, zero_stage):
    tok = tiny_tokenizer()
    exp = rl_experiment(tmp_path, algo=algo, minibatch_size=8, micro_batch_size=8, lr=1e-3)
    exp.model = ra_config()
    exp.runtime.zero_stage = zero_stage
    learner = Learner(exp, ra_model(vocab=len(tok)).train(), tok.pad_token_id)
    trajs = synthetic_episodes(8)
    batch = learner.prepare(trajs, fast=False)
    before = _rl_objective(learner, batch)
    learner.update(trajs, seed=0)
    assert _rl_objective(learner, batch) < before
