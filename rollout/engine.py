"""The embedded torch inference engine: batched decoding over a KV cache.

One interface for every backend (this one, vLLM): `generate` takes token-id prompts and returns
new token ids with their sampling log-probs; `update_weights` loads a new policy state dict.

Why it is fast on small policies: the prompt is run once (prefill), then each step feeds one token
per live sequence against the cache; sequences that stop are compacted out of the batch (and out
of the cache), so finished rows stop costing compute.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicLayer


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be ≥ 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be ≥ 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Completion:
    token_ids: list[int] = field(default_factory=list)
    # log-prob of each sampled token under the sampling distribution (logits / temperature, before
    # top-p truncation; plain log-softmax when greedy) — what an importance ratio needs.
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str = "length"  # "stop" (a stop token, included in token_ids) or "length"


class _GrowingLayer(DynamicLayer):
    """A KV-cache layer in preallocated buffers that double when full.

    transformers' DynamicLayer concatenates on every step, copying the whole cache each token
    (quadratic in length); here a token costs one slice write, and the buffers grow rarely.
    """

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._k = self._v = None
        self._len = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, h, t, d = key_states.shape  # [batch, kv heads, new tokens, head dim]
        need = self._len + t
        if self._k is None or need > self._k.shape[2]:
            cap = max(need, 2 * (self._k.shape[2] if self._k is not None else 0), 64)
            k, v = key_states.new_empty(b, h, cap, d), value_states.new_empty(b, h, cap, d)
            if self._len:
                k[:, :, : self._len] = self._k[:, :, : self._len]
                v[:, :, : self._len] = self._v[:, :, : self._len]
            self._k, self._v = k, v
        self._k[:, :, self._len : need] = key_states
        self._v[:, :, self._len : need] = value_states
        self._len = need
        self.keys, self.values = self._k[:, :, :need], self._v[:, :, :need]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized and self._k is not None:
            self._k, self._v = self._k[indices], self._v[indices]
            self.keys, self.values = self._k[:, :, : self._len], self._v[:, :, : self._len]


class GrowingCache(Cache):
    """A KV cache of `_GrowingLayer`s, one per decoder layer."""

    def __init__(self, num_layers: int):
        super().__init__(layers=[_GrowingLayer() for _ in range(num_layers)])


class InferenceEngine(Protocol):
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Completion]: ...

    def update_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None: ...


def sample_tokens(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] -> (tokens [B], logprobs [B])."""
    logits = logits.float()
    if temperature == 0:
        logp = torch.log_softmax(logits, dim=-1)
        tokens = logits.argmax(dim=-1)
        return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)
    logp = torch.log_softmax(logits / temperature, dim=-1)  # [B, V]
    probs = logp.exp()
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


class TorchEngine:
    """Batched KV-cache generation with any Hugging Face causal LM."""

    def __init__(
        self,
        model: PreTrainedModel,
        pad_token_id: int,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_batch_size: int = 256,
        compact_fraction: float = 0.125,
    ):
        self.model = model.to(device=device, dtype=dtype).eval()
        self.device = torch.device(device)
        self.pad_token_id = pad_token_id
        self.max_batch_size = max_batch_size
        # Compacting copies the whole cache, so wait until enough rows have finished.
        self.compact_fraction = compact_fraction

    def update_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state_dict, strict=True)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Completion]:
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token (a BOS token at least)")
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        # Similar lengths share a chunk, so left padding wastes little.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        results: list[Completion | None] = [None] * len(prompts)
        for start in range(0, len(order), self.max_batch_size):
            idx = order[start : start + self.max_batch_size]
            for i, completion in zip(idx, self._generate_chunk([prompts[i] for i in idx], params, generator)):
                results[i] = completion
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def _generate_chunk(self, prompts, params: SamplingParams, generator) -> list[Completion]:
        n, max_len = len(prompts), max(len(p) for p in prompts)
        dev = self.device
        input_ids = torch.full((n, max_len), self.pad_token_id, dtype=torch.long, device=dev)
        attn = torch.zeros((n, max_len), dtype=torch.long, device=dev)
        for row, p in enumerate(prompts):  # left padding: the last column is every row's last token
            input_ids[row, max_len - len(p) :] = torch.as_tensor(p, dtype=torch.long)
            attn[row, max_len - len(p) :] = 1
        positions = (attn.cumsum(-1) - 1).clamp(min=0)  # [n, T]
        next_pos = attn.sum(-1)  # [n] position of the next token of each row
        stop = torch.as_tensor(params.stop_token_ids or [-1], device=dev)

        cache = GrowingCache(self.model.config.num_hidden_layers)
        logits = self.model(
            input_ids=input_ids, attention_mask=attn, position_ids=positions,
            past_key_values=cache, use_cache=True, logits_to_keep=1,
        ).logits[:, -1]  # [n, V]

        rows = torch.arange(n, device=dev)  # batch slot -> prompt index
        done = torch.zeros(n, dtype=torch.bool, device=dev)  # finished but not yet compacted
        stopped = torch.zeros(n, dtype=torch.bool, device=dev)  # per prompt: ended on a stop token
        history = []  # per step: (prompt index, token, logprob) of the live slots, kept on device
        for step in range(params.max_new_tokens):
            tokens, logps = sample_tokens(logits, params.temperature, params.top_p, generator)
            live = ~done
            history.append((rows[live], tokens[live], logps[live]))
            hit_stop = torch.isin(tokens, stop) & live
            stopped[rows[hit_stop]] = True
            done |= hit_stop
            if bool(done.all()) or step == params.max_new_tokens - 1:
                break
            if int(done.sum()) >= max(1, int(self.compact_fraction * len(rows))):
                keep = (~done).nonzero().flatten()
                cache.batch_select_indices(keep)
                rows, attn, next_pos, tokens = rows[keep], attn[keep], next_pos[keep], tokens[keep]
                done = done[keep]
            attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=-1)
            logits = self.model(
                input_ids=tokens[:, None], attention_mask=attn, position_ids=next_pos[:, None],
                past_key_values=cache, use_cache=True,
            ).logits[:, -1]
            next_pos = next_pos + 1
        return self._completions(history, stopped)

    @staticmethod
    def _completions(history, stopped: torch.Tensor) -> list[Completion]:
        """Regroup the step-major history into one Completion per prompt (one host copy)."""
        n = len(stopped)
        rows = torch.cat([h[0] for h in history])
        order = torch.argsort(rows, stable=True)  # stable: each prompt's tokens stay in time order
        counts = torch.bincount(rows, minlength=n).tolist()
        tokens = torch.cat([h[1] for h in history])[order].tolist()
        logps = torch.cat([h[2] for h in history])[order].tolist()
        out, start = [], 0
        for i, k in enumerate(counts):
            out.append(Completion(tokens[start : start + k], logps[start : start + k],
                                  "stop" if stopped[i] else "length"))
            start += k
        return out
