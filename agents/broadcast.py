"""`model.context_broadcast`: uniform attention added to every attention head, on any backbone.

Trained transformers' attention maps drift toward uniform; the mean of the tokens supplies that
for free. The causal form here is a function of what the KV cache already holds: per head, the
softmax attention output plus the plain mean of the value vectors over the same keys the query
may attend to, before the output projection (docs/backbones.md):

    o_t = softmax(q_t K_A^T / √D) V_A  +  (1 / |A_t|) Σ_{j ∈ A_t} v_j

A_t = the keys query t's attention mask allows: the real (not padding) tokens at positions ≤ t,
and wherever a backbone takes keys away from every query (mod's skipped tokens) not those; the
query's own key is always in A_t. Under grouped-query attention every query head of a group adds
its key/value head's mean. The mean is uniform attention (softmax of equal scores), so it costs
one more weighted sum over the values (no parameters) and, being read from the cached values
under the same mask, it follows the engine's KV cache through left padding, prefill groups,
compaction and sessions with no state of its own.

Here: the math shared by every model and every engine decoder (`allowed_keys`, `uniform_weights`,
`add_uniform`), `ContextBroadcastAttention` (a mixin for transformers' Llama-style attention
modules), and the dense backbone with the flag on: `TurnstileLlamaConfig` / model_type
"turnstile_llama", a LlamaForCausalLM subclass registered with the Auto classes on import, which
agents.model.build_model builds for a `llama` section with the flag (without it, the plain
LlamaForCausalLM, which vLLM serves).
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForTokenClassification,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
)
from transformers.modeling_layers import GenericForTokenClassification
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaPreTrainedModel,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

MODEL_TYPE = "turnstile_llama"


# -- the math, shared by the models and the engine's decoders ----------------------------------------


def allowed_keys(mask: torch.Tensor | None, t: int, T: int, device: torch.device | str) -> torch.Tensor:
    """Which keys each query may attend to, bool [n or 1, 1 or H, t, T], from an attention mask
    as the attention receives it: None (transformers' SDPA path without padding: causal, the t
    queries being the last t of the T columns), bool (True = attend) or additive (0 = attend;
    -inf or the dtype's minimum = not)."""
    if mask is None:
        cols = torch.arange(T, device=device)
        return (cols <= (T - t + torch.arange(t, device=device))[:, None])[None, None]
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"model.context_broadcast reads the attention mask as a tensor, got {type(mask).__name__} "
                        "(use attn_implementation sdpa or eager)")
    mask = mask[..., : T]  # eager masks may be wider than the keys
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def uniform_weights(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Uniform attention: 1/|A_t| on each allowed key, 0 elsewhere; [.., t, T] in `dtype` (the
    count in fp32: bf16 holds integers exactly only up to 256). A row with no allowed key gives 0."""
    count = allowed.sum(-1, keepdim=True, dtype=torch.float32).clamp(min=1)
    return (allowed.float() / count).to(dtype)


def add_uniform(o: torch.Tensor, weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """o + uniform attention over the values: o [n, H, t, D] (the softmax attention's output),
    weights [n or 1, 1 or KV, t, T] (`uniform_weights`), values [n, KV, T, D]; each query head adds
    its key/value head's mean. Returns [n, H, t, D]."""
    n, H, t, D = o.shape
    KV = values.shape[1]
    mean = torch.matmul(weights, values)  # [n, KV, t, D]
    if KV == H:
        return o + mean
    return (o.reshape(n, KV, H // KV, t, D) + mean[:, :, None]).view(n, H, t, D)


# -- transformers' attention ---------------------------------------------------------------------------


class ContextBroadcastAttention:
    """LlamaAttention.forward (q/k/v and o projections, RoPE, the cache, the configured attention
    backend) with `add_uniform` over the keys its attention mask allows. A mixin before any
    Llama-style attention class (same projections' names): BroadcastLlamaAttention below,
    agents.monarch's BroadcastMonarchAttention."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [b, H, t, D]
        k = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [b, KV, t, D]
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)  # [b, KV, T, D] each
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        o, attn_weights = attend(self, q, k, v, attention_mask, dropout=0.0 if not self.training else
                                 self.attention_dropout, scaling=self.scaling, **kwargs)  # [b, t, H, D]
        t, T = q.shape[2], k.shape[2]
        weights = uniform_weights(allowed_keys(attention_mask, t, T, q.device), v.dtype)
        o = add_uniform(o.transpose(1, 2), weights, v).transpose(1, 2)
        o = o.reshape(*input_shape, -1).contiguous()
        return self.o_proj(o), attn_weights


class BroadcastLlamaAttention(ContextBroadcastAttention, LlamaAttention):
    """Llama's attention plus uniform attention (same parameters)."""


# -- the dense backbone with the flag ----------------------------------------------------------------


class TurnstileLlamaConfig(LlamaConfig):
    """A Llama config plus `context_broadcast` (saved in config.json, restored by from_pretrained)."""

    model_type = MODEL_TYPE
    context_broadcast: bool = False


class TurnstileLlamaPreTrainedModel(LlamaPreTrainedModel):
    config_class = TurnstileLlamaConfig
    config: TurnstileLlamaConfig


class TurnstileLlamaModel(TurnstileLlamaPreTrainedModel, LlamaModel):
    """LlamaModel, its attention BroadcastLlamaAttention when config.context_broadcast."""

    def __init__(self, config: TurnstileLlamaConfig):
        LlamaModel.__init__(self, config)
        if config.context_broadcast:
            for i, layer in enumerate(self.layers):
                layer.self_attn = BroadcastLlamaAttention(config, i)
            self.post_init()


class TurnstileLlamaForCausalLM(TurnstileLlamaPreTrainedModel, LlamaForCausalLM):
    def __init__(self, config: TurnstileLlamaConfig):
        TurnstileLlamaPreTrainedModel.__init__(self, config)
        self.model = TurnstileLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


class TurnstileLlamaForTokenClassification(GenericForTokenClassification, TurnstileLlamaPreTrainedModel):
    """The PPO critic's class (algos/learner.py: build_critic): a TurnstileLlamaModel and a `score` head."""


AutoConfig.register(MODEL_TYPE, TurnstileLlamaConfig, exist_ok=True)
AutoModel.register(TurnstileLlamaConfig, TurnstileLlamaModel, exist_ok=True)
AutoModelForCausalLM.register(TurnstileLlamaConfig, TurnstileLlamaForCausalLM, exist_ok=True)
AutoModelForTokenClassification.register(TurnstileLlamaConfig, TurnstileLlamaForTokenClassification, exist_ok=True)

