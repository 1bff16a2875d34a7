"""The embedded engine: KV-cached batched decoding equals plain transformers, log-probs match."""
import shutil

import pytest
import torch

from agents.model import ModelConfig, build_model
from rollout.engine import SamplingParams, TorchEngine

VOCAB = 300


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(ModelConfig(hidden_size=64, num_heads=2, num_layers=2, max_seq_len=256), VOCAB, 0, 1, 2).eval()


def _prompts(n, seed=0, max_len=40):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len, (n,), generator=g)
    return [torch.randint(3, VOCAB, (int(k),), generator=g).tolist() for k in lengths]


def test_greedy_equals_uncached_generation_with_stops_and_compaction(model):
    # Many stop tokens: rows finish at different steps, so the batch is compacted repeatedly.
    stops = tuple(range(3, VOCAB, 11))
    prompts = _prompts(24)
    out = TorchEngine(model, pad_token_id=0).generate(
        prompts, SamplingParams(max_new_tokens=40, temperature=0, stop_token_ids=stops))
    assert {c.finish_reason for c in out} == {"stop", "length"}
    for p, c in zip(prompts, out):
        ids = torch.tensor([p])
        ref = []
        for _ in range(40):  # plain greedy decoding, re-running the whole sequence each token
            nxt = int(model(ids).logits[0, -1].argmax())
            ref.append(nxt)
            if nxt in stops:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        assert c.token_ids == ref


def test_logprobs_match_a_transformers_forward(model):
    prompts = _prompts(16, seed=1)
    out = TorchEngine(model, pad_token_id=0).generate(
        prompts, SamplingParams(max_new_tokens=30, temperature=1.0, seed=3))
    for p, c in zip(prompts, out):
        full = torch.tensor([p + c.token_ids])
        logp = torch.log_softmax(model(full).logits[0].float(), -1)[len(p) - 1 : -1]
        ref = logp.gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(-1)
        assert torch.allclose(ref, torch.tensor(c.logprobs), atol=1e-4)


def test_sampling_is_reproducible_by_seed_and_top_p_restricts(model):
    eng = TorchEngine(model, pad_token_id=0)
    prompts = _prompts(8, seed=2)
    a = eng.generate(prompts, SamplingParams(max_new_tokens=20, temperature=1.0, seed=7))
    b = eng.generate(prompts, SamplingParams(max_new_tokens=20, temperature=1.0, seed=7))
    c = eng.generate(prompts, SamplingParams(max_new_tokens=20, temperature=1.0, seed=8))
    assert [x.token_ids for x in a] == [x.token_ids for x in b] != [x.token_ids for x in c]
    # A tiny top_p keeps only the most likely token: sampling becomes greedy.
    greedy = eng.generate(prompts, SamplingParams(max_new_tokens=20, temperature=0))
    nucleus = eng.generate(prompts, SamplingParams(max_new_tokens=20, temperature=1.0, top_p=1e-6, seed=1))
    assert [x.token_ids for x in greedy] == [x.token_ids for x in nucleus]


def test_update_weights_changes_outputs(model):
    eng = TorchEngine(build_model(ModelConfig(hidden_size=64, num_heads=2, num_layers=2), VOCAB, 0, 1, 2), 0)
    prompts = _prompts(4, seed=4)
    params = SamplingParams(max_new_tokens=10, temperature=0)
    eng.update_weights(model.state_dict())
    ref = TorchEngine(model, 0).generate(prompts, params)
    assert [c.token_ids for c in eng.generate(prompts, params)] == [c.token_ids for c in ref]


def test_bad_input_is_refused(model):
    eng = TorchEngine(model, pad_token_id=0)
    with pytest.raises(ValueError, match="at least one token"):
        eng.generate([[5, 6], []], SamplingParams(max_new_tokens=4))
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)


# -- sessions: the KV of a conversation is kept between turns ------------------------------------

STOPS = tuple(range(3, VOCAB, 11))


def _fresh_model(seed):
    torch.manual_seed(seed)
    return build_model(ModelConfig(hidden_size=64, num_heads=2, num_layers=2, max_seq_len=512), VOCAB, 0, 1, 2).eval()


def _next_prompts(prompts, outs, seed):
    """Next turn: prompt + completion + an observation of a different length per row."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 12, (len(prompts),), generator=g)
    obs = [torch.randint(3, VOCAB, (int(k),), generator=g).tolist() for k in lengths]
    return [p + c.token_ids + o for p, c, o in zip(prompts, outs, obs)]


def _assert_same(a, b, atol=1e-5):
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert [c.finish_reason for c in a] == [c.finish_reason for c in b]
    for x, y in zip(a, b):
        assert torch.allclose(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=atol)


def test_sessions_multi_turn_greedy_equals_fresh_generation(model):
    eng = TorchEngine(model, pad_token_id=0)
    params = SamplingParams(max_new_tokens=24, temperature=0, stop_token_ids=STOPS)
    prompts = _prompts(12, seed=5, max_len=30)
    keys = [f"episode-{i}" for i in range(len(prompts))]
    reasons, stored = set(), []
    for turn in range(3):
        before = dict(eng.stats)
        out = eng.generate(prompts, params, sessions=keys)
        ref = TorchEngine(model, pad_token_id=0).generate(prompts, params)
        _assert_same(out, ref)
        reasons |= {c.finish_reason for c in out}
        # log-probs still match a plain forward of the full sequence
        for p, c in zip(prompts, out):
            logp = torch.log_softmax(model(torch.tensor([p + c.token_ids])).logits[0].float(), -1)[len(p) - 1 : -1]
            ref_lp = logp.gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(-1)
            assert torch.allclose(ref_lp, torch.tensor(c.logprobs), atol=1e-4)
        if turn:  # only the new observation tokens were run, the rest came from the stored KV
            assert eng.stats["prefill_tokens"] - before["prefill_tokens"] == sum(map(len, prompts)) - sum(stored)
            assert eng.stats["reused_tokens"] - before["reused_tokens"] == sum(stored)
        stored = [len(p) + len(c.token_ids) - 1 for p, c in zip(prompts, out)]
        prompts = _next_prompts(prompts, out, seed=100 + turn)
    assert reasons == {"stop", "length"}
    assert eng.num_sessions == len(keys)


def test_sessions_with_mixed_new_and_known_keys_and_sampling(model):
    eng = TorchEngine(model, pad_token_id=0)
    greedy = SamplingParams(max_new_tokens=16, temperature=0, stop_token_ids=STOPS)
    prompts = _prompts(6, seed=6)
    out = eng.generate(prompts[:3], greedy, sessions=[0, 1, 2])
    nxt = _next_prompts(prompts[:3], out, seed=7) + prompts[3:]
    out2 = eng.generate(nxt, greedy, sessions=[0, 1, 2, 3, 4, 5])  # half cached, half new
    _assert_same(out2, TorchEngine(model, pad_token_id=0).generate(nxt, greedy))
    # sampled log-probs with sessions match a transformers forward too
    nxt2 = _next_prompts(nxt, out2, seed=8)
    out3 = eng.generate(nxt2, SamplingParams(max_new_tokens=16, temperature=0.7, seed=1), sessions=range(6))
    for p, c in zip(nxt2, out3):
        logp = torch.log_softmax(model(torch.tensor([p + c.token_ids])).logits[0].float() / 0.7, -1)[len(p) - 1 : -1]
        ref = logp.gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(-1)
        assert torch.allclose(ref, torch.tensor(c.logprobs), atol=1e-4)


def test_session_that_is_not_a_prefix_falls_back(model):
    eng = TorchEngine(model, pad_token_id=0)
    params = SamplingParams(max_new_tokens=10, temperature=0)
    prompts = _prompts(3, seed=9, max_len=30)
    prompts = [p + [7, 8, 9] for p in prompts]
    out = eng.generate(prompts, params, sessions=["a", "b", "c"])
    new = [
        [5] + prompts[0][1:] + out[0].token_ids,  # differs at the first token: nothing reusable
        prompts[1][:-2] + [4, 4, 4, 4],  # shares all but the last two prompt tokens
        prompts[2] + out[2].token_ids[:-1],  # exactly what was stored: one token must still run
    ]
    before = dict(eng.stats)
    got = eng.generate(new, params, sessions=["a", "b", "c"])
    _assert_same(got, TorchEngine(model, pad_token_id=0).generate(new, params))
    assert eng.stats["reused_tokens"] - before["reused_tokens"] == 0 + (len(prompts[1]) - 2) + (len(new[2]) - 1)
    assert eng.stats["prefill_tokens"] - before["prefill_tokens"] == len(new[0]) + 4 + 1


def test_update_weights_clears_sessions():
    a, b = _fresh_model(1), _fresh_model(2)
    eng = TorchEngine(_fresh_model(1), pad_token_id=0)
    params = SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=STOPS)
    prompts = _prompts(5, seed=10)
    out = eng.generate(prompts, params, sessions=range(5))
    _assert_same(out, TorchEngine(a, pad_token_id=0).generate(prompts, params))
    assert eng.num_sessions == 5
    eng.update_weights(b.state_dict())
    assert eng.num_sessions == 0
    nxt = _next_prompts(prompts, out, seed=11)
    before = eng.stats["reused_tokens"]
    _assert_same(eng.generate(nxt, params, sessions=range(5)), TorchEngine(b, pad_token_id=0).generate(nxt, params))
    assert eng.stats["reused_tokens"] == before


def test_release_and_lru_eviction(model):
    eng = TorchEngine(model, pad_token_id=0, max_sessions=2)
    params = SamplingParams(max_new_tokens=4, temperature=0)
    prompts = _prompts(3, seed=12)
    outs = [eng.generate([prompt], params, sessions=[key])[0] for prompt, key in zip(prompts, "xyz")]
    # "z" evicted "x", the least recently used
    assert eng.num_sessions == 2
    eng.release(["y", "unknown"])
    assert eng.num_sessions == 1
    before = dict(eng.stats)
    eng.generate([p + c.token_ids + [5, 6] for p, c in zip(prompts[::2], outs[::2])], params, sessions=["x", "z"])
    assert eng.stats["reused_tokens"] - before["reused_tokens"] == len(prompts[2]) + 3  # only "z" was kept
    with pytest.raises(ValueError, match="distinct"):
        eng.generate([[3], [4]], params, sessions=["x", "x"])


def _engine(model, mode):
    """mode: "onednn" (lean forward, packed oneDNN matmuls), "linear" (lean forward, F.linear),
    "compiled" (lean forward, decode attention compiled by inductor) or "model" (the model's own forward)."""
    eng = TorchEngine(model, pad_token_id=0, fast_forward=mode != "model", compile_attention=mode == "compiled")
    if mode == "linear":
        eng._decoder.onednn, eng._decoder._key = False, None
    return eng


@pytest.mark.parametrize("mode,kv_heads", [("onednn", 1), ("linear", 1), ("linear", 2), ("compiled", 1),
                                           ("compiled", 2), ("model", 2), ("model", 1)])
def test_each_forward_path_with_gqa_matches_plain_decoding(mode, kv_heads):
    """The lean Llama forward (both matmul paths, the compiled decode attention, GQA too) and the
    fallback through the model's own forward give the same tokens, with and without sessions, and
    log-probs that match a forward."""
    torch.manual_seed(3)
    model = build_model(ModelConfig(hidden_size=64, num_heads=2, num_kv_heads=kv_heads, num_layers=2), VOCAB, 0, 1, 2)
    eng = _engine(model.eval(), mode)
    if mode == "onednn" and not eng._decoder.onednn:
        pytest.skip("oneDNN's packed linear is not available here")
    if mode == "compiled" and eng._decoder.attend_one is None:
        # the probe refuses a kernel that fails to build or disagrees with SDPA; only the first is excusable
        assert not (shutil.which("g++") or shutil.which("c++")), "the compiled decode attention was refused"
        pytest.skip("torch.compile cannot build CPU kernels here (no C++ compiler)")
    params = SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=STOPS)
    prompts = _prompts(6, seed=13, max_len=20)
    for turn in range(2):
        out = eng.generate(prompts, params, sessions=range(6))
        _assert_same(out, _engine(model, "model" if mode != "model" else "linear").generate(prompts, params))
        for p, c in zip(prompts, out):
            logp = torch.log_softmax(model(torch.tensor([p + c.token_ids])).logits[0].float(), -1)[len(p) - 1 : -1]
            ref = logp.gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(-1)
            assert torch.allclose(ref, torch.tensor(c.logprobs), atol=1e-4)
        prompts = _next_prompts(prompts, out, seed=14 + turn)


def test_decode_attention_is_picked_by_timing_it_on_this_cpu(monkeypatch):
    """compile_attention=None in bf16 on CPU: the compiled decode kernel only where it is timed
    faster than SDPA (it is on an AMD EPYC, not on a Xeon with AMX), and the engine says which."""
    from rollout import kernels

    compiled = kernels.compiled_decode_attention(torch.bfloat16)
    if compiled is None:
        assert not (shutil.which("g++") or shutil.which("c++")), "the compiled decode attention was refused"
        pytest.skip("torch.compile cannot build CPU kernels here (no C++ compiler)")
    for compiled_seconds, picked in ((1.0, None), (0.5, compiled), (0.95, None)):  # SDPA takes 1.0 s
        kernels._PICKED.clear()
        monkeypatch.setattr(kernels, "_time_decode_kernels", lambda *a, s=compiled_seconds: (1.0, s))
        eng = TorchEngine(_fresh_model(5), pad_token_id=0, dtype=torch.bfloat16)
        assert eng._decoder.attend_one is picked
        assert eng.decoder_attention.startswith("compiled" if picked else "sdpa")
        assert f"{compiled_seconds:.2f}x" in eng.decoder_attention
    kernels._PICKED.clear()
    monkeypatch.setattr(kernels, "compiled_decode_attention", lambda dtype: None)
    eng = TorchEngine(_fresh_model(5), pad_token_id=0, dtype=torch.bfloat16)
    assert eng._decoder.attend_one is None and "does not build" in eng.decoder_attention
    kernels._PICKED.clear()
    # fp32, or an explicit choice, is not timed
    assert TorchEngine(_fresh_model(5), pad_token_id=0).decoder_attention == "sdpa"
    assert TorchEngine(_fresh_model(5), pad_token_id=0, dtype=torch.bfloat16,
                       compile_attention=False).decoder_attention == "sdpa"
    assert TorchEngine(_fresh_model(5), pad_token_id=0, fast_forward=False).decoder_attention is None


def test_in_place_weight_changes_are_seen():
    """The lean forward's fused weights follow in-place changes to the model (e.g. an optimizer step)."""
    model = _fresh_model(4)
    eng = TorchEngine(model, pad_token_id=0)
    params = SamplingParams(max_new_tokens=8, temperature=0)
    prompts = _prompts(4, seed=15)
    before = eng.generate(prompts, params)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    after = eng.generate(prompts, params)
    _assert_same(after, TorchEngine(model, pad_token_id=0, fast_forward=False).generate(prompts, params))
    assert [c.token_ids for c in after] != [c.token_ids for c in before]


def test_prefill_length_groups_cover_the_batch_at_least_cost():
    from itertools import combinations

    from rollout.engine import _length_groups

    lengths = sorted([3, 4, 4, 9, 10, 30, 31, 33])
    groups = _length_groups(lengths, 8)
    assert groups[0][0] == 0 and groups[-1][1] == len(lengths)
    assert all(a < b and b == c for (a, b), (c, _) in zip(groups, groups[1:]))

    def cost(cuts):
        bounds = [0, *cuts, len(lengths)]
        return sum((b - a) * lengths[b - 1] + 8 for a, b in zip(bounds, bounds[1:]))

    best = min(cost(c) for k in range(len(lengths)) for c in combinations(range(1, len(lengths)), k))
    assert cost([b for _, b in groups[:-1]]) == best
    assert _length_groups([5], 8) == [(0, 1)]


def test_constrained_decoding_writes_only_the_given_choices(model):
    # Three prompts: two may only write one of their choice sequences (each ends in a stop token),
    # the third is free and (greedy) must decode exactly as without choices.
    stop = 7
    prompts = _prompts(3, seed=4)
    choices = [[[11, 12, stop], [11, 40, 41, stop], [90, stop]], [[55, 56, 57, 58, stop]], None]
    eng = TorchEngine(model, pad_token_id=0)
    for params in (SamplingParams(max_new_tokens=8, temperature=0, stop_token_ids=(stop,)),
                   SamplingParams(max_new_tokens=8, temperature=1.0, seed=5, stop_token_ids=(stop,))):
        out = eng.generate(prompts, params, choices=choices)
        free = eng.generate(prompts[2:], params)
        assert out[0].token_ids in choices[0] and out[1].token_ids == choices[1][0]
        assert all(c.finish_reason == "stop" for c in out[:2])
        if params.temperature == 0:  # (sampled draws depend on the batch's shape)
            assert out[2].token_ids == free[0].token_ids
        # The log-probs are those of the masked distribution the tokens were drawn from.
        for p, c, allowed in zip(prompts[:2], out[:2], choices[:2]):
            logits = model(torch.tensor([p + c.token_ids])).logits[0, len(p) - 1 : -1].float()
            for t, (token, logp) in enumerate(zip(c.token_ids, c.logprobs)):
                ok = sorted({seq[t] for seq in allowed if seq[:t] == c.token_ids[:t]})
                scaled = logits[t] / max(params.temperature, 1e-9) if params.temperature else logits[t]
                ref = torch.log_softmax(scaled[ok], -1)[ok.index(token)]
                assert abs(float(ref) - logp) < 1e-4
        assert out[1].logprobs == pytest.approx([0.0] * 5, abs=1e-6)  # one choice: no freedom at all
        # What was allowed at each step travels with the completion (the learner masks the same way).
        assert set(out[0].allowed[0]) == {11, 90} and out[1].allowed == [[t] for t in choices[1][0]]
        assert out[2].allowed is None and len(out[0].allowed) == len(out[0].token_ids)


def test_greedy_choice_is_the_models_own_best_path(model):
    # Among its own greedy completion and distractors, constrained greedy decoding picks its own
    # (every step's argmax is allowed), with log-probs raised by the renormalisation over fewer tokens.
    prompts = _prompts(4, seed=6)
    eng = TorchEngine(model, pad_token_id=0)
    params = SamplingParams(max_new_tokens=5, temperature=0)
    free = eng.generate(prompts, params)
    distractors = [[t % (VOCAB - 3) + 3 for t in (c.token_ids[0] + 1, 17, 18, 19, 20)] for c in free]
    out = eng.generate(prompts, params, choices=[[d, c.token_ids] for c, d in zip(free, distractors)])
    assert [c.token_ids for c in out] == [c.token_ids for c in free]
    for c, f in zip(out, free):
        assert all(a >= b - 1e-6 for a, b in zip(c.logprobs, f.logprobs)) and c.logprobs[1:] == pytest.approx([0.0] * 4)


# -- the decoder forward (rollout/decoders/) on its own ------------------------------------------


@pytest.mark.parametrize("matmuls", ["onednn", "linear"])
@pytest.mark.parametrize("kv_heads", [2, 1])
def test_decoder_forward_equals_the_models_own_with_and_without_a_cache(kv_heads, matmuls):
    """The cached forward `decoder_for` picks gives the model's own last-position logits for a
    whole prompt, for a prompt whose prefix is already cached, and for one-token decode steps."""
    from rollout.decoders import LlamaDecoder, decoder_for
    from rollout.kv_cache import GrowingCache

    torch.manual_seed(5)
    model = build_model(ModelConfig(hidden_size=64, num_heads=2, num_kv_heads=kv_heads, num_layers=2), VOCAB, 0, 1, 2)
    model.eval()
    decoder = decoder_for(model)
    assert isinstance(decoder, LlamaDecoder)
    if matmuls == "linear":
        decoder.onednn = False
    elif not decoder.onednn:
        pytest.skip("oneDNN's packed linear is not available here")
    decoder.refresh()
    ids = torch.randint(3, VOCAB, (3, 20), generator=torch.Generator().manual_seed(6))  # 3 rows, no padding
    positions = torch.arange(20).expand(3, 20)

    def run(cache, a, b):
        """Feed columns [a, b) after the cached [0, a): each query sees the cache and itself causally."""
        causal = torch.arange(b)[None, :] <= torch.arange(a, b)[:, None]  # [b - a, b]
        with torch.no_grad():
            return decoder(ids[:, a:b], positions[:, a:b], cache.layers, causal.expand(3, 1, b - a, b))

    with torch.no_grad():
        ref = model(ids).logits.float()  # [3, 20, V]
    whole = run(GrowingCache(2), 0, 20)
    cache = GrowingCache(2)
    prefix, rest = run(cache, 0, 12), run(cache, 12, 18)
    steps = [run(cache, t, t + 1) for t in (18, 19)]
    for got, col in [(whole, 19), (prefix, 11), (rest, 17), (steps[0], 18), (steps[1], 19)]:
        assert torch.allclose(got, ref[:, col], atol=1e-5), (col, (got - ref[:, col]).abs().max())


def test_models_without_a_decoder_run_through_their_own_forward(model):
    from transformers import LlamaConfig, LlamaForCausalLM

    from rollout.decoders import decoder_for

    torch.manual_seed(7)  # a Llama with GELU, which the lean forward does not implement
    other = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=2, hidden_act="gelu"))
    assert decoder_for(model) is not None and decoder_for(other) is None
    eng = TorchEngine(other.eval(), pad_token_id=0)
    assert eng._decoder is None
    prompts = _prompts(3, seed=16)
    out = eng.generate(prompts, SamplingParams(max_new_tokens=6, temperature=0))
    for p, c in zip(prompts, out):
        assert c.token_ids[0] == int(other(torch.tensor([p])).logits[0, -1].argmax())
