"""The embedded engine: KV-cached batched decoding equals plain transformers, log-probs match."""
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
