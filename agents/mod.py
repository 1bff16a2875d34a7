"""The `mod` backbone: mixture of depths (γ-MoD), made causal, on Llama.

In each routed layer ℓ (`model.mod_layers`; default all but the first and the last) a token t
decides for itself whether to run the layer or ride the residual past it:

    h_t   = rms_norm(x_t)                               the attention's pre-norm, [C]
    p_t   = σ(w_ℓ · h_t + b_ℓ)                          router probability (fp32)
    run_t = p_t > τ                                     τ = model.mod_threshold
    a_t   = Attn(h)_t     over the keys of the tokens s ≤ t with run_s (t itself included)
    m_t   = MLP(rms_norm(x_t + a_t))
    x'_t  = x_t + p_t · (a_t + m_t)     if run_t
          = x_t                         otherwise

The decision reads only token t's own hidden state, which depends only on tokens ≤ t: routing is
causal, the same in the learner and in the engine (γ-MoD's top-k over the sequence would read the
future). Positions are the original ones (RoPE of the token's place in the sequence, skipped
tokens included). A skipped token leaves no key/value in the layer: later tokens cannot attend to
it there. p_t scales the whole block's delta (a + m), as in MoD's x' = x + r·f(x): the hard
decision has no gradient, the scale gives the router ∂L/∂p_t = ⟨∂L/∂x'_t, a_t + m_t⟩ (how much
running the layer helped this token). Inside the block the MLP reads x + a unscaled, so a routed
token runs exactly a Llama layer.

The capacity regulariser (`auxiliary_loss`, added to the SFT and RL losses by
agents.model.auxiliary_losses) pulls the mean router probability over real tokens and routed
layers to `model.mod_capacity`:

    L_cap = mod_coef · (mean_{ℓ ∈ routed, t real} p_{ℓ,t} − mod_capacity)²

The routers start biased (b = logit(τ) + 2, weights ~ N(0, 0.02)) so that every token runs with
p ≈ 0.88 (τ = 0.5): SFT starts near the dense model and the regulariser then lowers p.

How "no key/value" is kept in a KV cache: a skipped token's column in a routed layer holds key 0
and value SKIPPED_VALUE (every element); whoever reads that cache (this model's attention, the
engine's decoder in rollout/decoders/mod.py) turns those columns into a -inf attention bias. The
marker lives inside the cached values, so it follows the column through everything the engine
does with its KV (compaction, per-session extraction and reuse) without a record beside it.
Other queries weight it by an exact 0; only the skipped token's own output, which is dropped,
reads it: it never reaches a kept output or a gradient.

Compute: a routed layer runs the q/k/v, output and MLP matmuls on the routed tokens only (they are
gathered, and scattered back); the attention scores are computed for every query against every
column and masked (`flops_per_token` counts both).

Also here: the Auto-class registration (on import), `routing_stats`, parameter and FLOP counts.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForTokenClassification,
    LlamaConfig,
)
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GenericForTokenClassification
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from agents.broadcast import add_uniform, uniform_weights

if TYPE_CHECKING:
    from agents.model import ModelConfig

# A skipped token's cached value in a routed layer (its key is 0): a power of two, exact in fp32,
# bf16 and fp16, far outside what a value projection of a normed state gives, and small enough
# that fp16 arithmetic on it stays finite.
SKIPPED_VALUE = -(2.0**15)
ROUTER_MARGIN = 2.0  # initial router bias above logit(τ): every token runs, p = σ(logit τ + 2)


def skipped_columns(values: torch.Tensor) -> torch.Tensor:
    """Which cache columns hold a skipped token: values [n, KV, T, D] -> [n, T] bool."""
    return values[:, 0, :, 0] == SKIPPED_VALUE


def skip_mask(mask: torch.Tensor, values: torch.Tensor, t: int) -> torch.Tensor:
    """`mask` [n, 1, t, T] (bool: True = attend) with the skipped tokens' columns taken out, except
    each query's own column (the last t columns are the queries'): no query row is left empty (an
    empty row is NaN in the forward and in the backward), and a skipped query's output is dropped."""
    T = values.shape[2]
    own = torch.arange(T, device=values.device) == (T - t + torch.arange(t, device=values.device))[:, None]  # [t, T]
    return mask & (~skipped_columns(values)[:, None, None, :] | own)


class ModConfig(LlamaConfig):
    """A Llama config plus the routing fields (saved in config.json, restored by from_pretrained)."""

    model_type = "turnstile_mod"

    mod_layers: list[int] | None = None  # routed layers; None = all but the first and the last
    mod_capacity: float = 0.5  # target mean router probability (the regulariser's c)
    mod_threshold: float = 0.5  # τ: a token runs a routed layer when p > τ
    mod_coef: float = 0.01  # weight of the capacity regulariser
    context_broadcast: bool = False  # uniform attention added to each head (agents/broadcast.py)

    def __post_init__(self, **kwargs):
        if self.mod_layers is None:
            self.mod_layers = list(range(1, self.num_hidden_layers - 1))
        self.mod_layers = sorted(int(i) for i in self.mod_layers)
        super().__post_init__(**kwargs)


class ModRouter(nn.Linear):
    """p = σ(w · h + b) [b, t] from h [b, t, C], in fp32 (autocast off): in bf16 a token whose p is
    near τ would flip between two forwards that differ only in rounding."""

    def __init__(self, hidden_size: int):
        super().__init__(hidden_size, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        with torch.autocast(h.device.type, enabled=False):
            return torch.sigmoid(F.linear(h.float(), self.weight.float(), self.bias.float())).squeeze(-1)


class ModAttention(LlamaAttention):
    """Llama attention where, in a routed layer, only the routed tokens are projected and the
    skipped ones leave a marked (key 0, value SKIPPED_VALUE) column that no other query reads."""

    def forward(self, h: torch.Tensor, position_embeddings, mask: torch.Tensor, past_key_values: Cache | None = None,
                route: torch.Tensor | None = None) -> torch.Tensor:
        """h [b, t, C] (normed); mask [b, 1, t, T] bool; route: None (a dense layer) or the flat
        indices [r] of the routed tokens in the b·t grid. Returns the o_proj output: [b, t, C], or
        [r, C] for the routed tokens only."""
        b, t, C = h.shape
        H, KV, D = self.config.num_attention_heads, self.config.num_key_value_heads, self.head_dim
        if route is None:
            q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)  # [b, t, H D], [b, t, KV D] x2
        else:  # project the routed tokens only, scatter them back into the b·t grid
            h_r = h.reshape(b * t, C)[route]  # [r, C]
            q = h.new_zeros(b * t, H * D).index_copy(0, route, self.q_proj(h_r))
            k = h.new_zeros(b * t, KV * D).index_copy(0, route, self.k_proj(h_r))
            v = h.new_full((b * t, KV * D), SKIPPED_VALUE).index_copy(0, route, self.v_proj(h_r))
        q = q.view(b, t, H, D).transpose(1, 2)  # [b, H, t, D]
        k = k.view(b, t, KV, D).transpose(1, 2)  # [b, KV, t, D]
        v = v.view(b, t, KV, D).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)  # a skipped token's key stays 0
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)  # [b, KV, T, D] each
        if route is not None:
            mask = skip_mask(mask, v, t)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling, enable_gqa=H != KV)
        if self.config.context_broadcast:  # the mean of the values over the same keys (skipped ones excluded)
            o = add_uniform(o, uniform_weights(mask, v.dtype), v)
        o = o.transpose(1, 2).reshape(b * t, H * D)  # [b t, H D]
        if route is None:
            return self.o_proj(o).view(b, t, C)
        return self.o_proj(o[route])  # [r, C]: a skipped query's output is never used


class ModDecoderLayer(LlamaDecoderLayer):
    """A Llama layer, routed when its index is in config.mod_layers (then it has a `router`)."""

    def __init__(self, config: ModConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.self_attn = ModAttention(config, layer_idx)
        self.threshold = config.mod_threshold
        self.router = ModRouter(config.hidden_size) if layer_idx in config.mod_layers else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor, position_embeddings,
                past_key_values: Cache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [b, t, C] -> (x' [b, t, C], router probabilities p [b, t] or None in a dense layer)."""
        h = self.input_layernorm(x)
        if self.router is None:
            x = x + self.self_attn(h, position_embeddings, mask, past_key_values)
            return x + self.mlp(self.post_attention_layernorm(x)), None
        b, t, C = x.shape
        p = self.router(h)  # [b, t] fp32
        route = (p > self.threshold).flatten().nonzero().squeeze(1)  # [r] routed tokens of the b·t grid
        a = self.self_attn(h, position_embeddings, mask, past_key_values, route)  # [r, C]
        x = x.reshape(b * t, C)
        m = self.mlp(self.post_attention_layernorm(x[route] + a))  # [r, C]
        scale = p.flatten()[route, None].to(x.dtype)  # [r, 1]
        return x.index_add(0, route, scale * (a + m)).view(b, t, C), p  # skipped rows: x unchanged


class ModPreTrainedModel(LlamaPreTrainedModel):
    config_class = ModConfig
    config: ModConfig
    _no_split_modules = ["ModDecoderLayer"]
    _supports_flash_attn = False  # the attention is SDPA with the routing mask, always
    _supports_flex_attn = False
    _can_record_outputs = {}

    def _init_weights(self, module):
        super()._init_weights(module)  # a router is an nn.Linear: weight N(0, 0.02), bias 0
        if isinstance(module, ModRouter):
            tau = self.config.mod_threshold
            init.constant_(module.bias, math.log(tau / (1 - tau)) + ROUTER_MARGIN)


class ModModel(ModPreTrainedModel):
    """The decoder stack. Keeps the routed layers' router probabilities of its last forward for
    `auxiliary_loss` (the capacity regulariser) and `routing_stats`."""

    def __init__(self, config: ModConfig):
        super().__init__(config)
        self.padding_idx, self.vocab_size = config.pad_token_id, config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([ModDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.last_probs: list[torch.Tensor] = []  # per routed layer [b, t], from the last forward
        self.post_init()

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                **kwargs) -> BaseModelOutputWithPast:
        """attention_mask: None or 2-D [b, past + t] (1 = a real token). A cache is made only when
        use_cache is True (the learner's forwards never need one)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # [b, t, C]
        b, t = x.shape[:2]
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = (past + torch.arange(t, device=x.device))[None]  # [1, t]
        mask = causal_mask(attention_mask, b, t, past, x.device)  # [b, 1, t, T]
        position_embeddings = self.rotary_emb(x, position_ids)  # cos, sin [b or 1, t, D]
        probs = []
        for layer in self.layers:
            x, p = layer(x, mask, position_embeddings, past_key_values=past_key_values)
            if p is not None:
                probs.append(p)
        self.last_probs = probs
        return BaseModelOutputWithPast(last_hidden_state=self.norm(x), past_key_values=past_key_values)

    def auxiliary_loss(self, token_mask: torch.Tensor) -> tuple[torch.Tensor, dict] | None:
        """(coef · (mean p − capacity)², stats) over the tokens where `token_mask` [b, t] is nonzero,
        from the last forward. Stats: `capacity_loss` (the loss), `mod_prob` (mean p) and
        `mod_rate_<layer>` (share of the tokens that ran each routed layer)."""
        if not self.last_probs:
            return None
        p = torch.stack(self.last_probs)  # [L_r, b, t]
        if tuple(token_mask.shape) != tuple(p.shape[1:]):
            raise ValueError(f"token mask {tuple(token_mask.shape)} for a forward over {tuple(p.shape[1:])} tokens")
        m = token_mask.to(p.device, torch.float32)
        tokens = m.sum().clamp(min=1)
        mean_p = (p * m).sum() / (tokens * p.shape[0])
        loss = self.config.mod_coef * (mean_p - self.config.mod_capacity) ** 2
        stats = {"capacity_loss": loss.detach(), "mod_prob": mean_p.detach(), **routing_stats(self, token_mask)}
        return loss, stats


def causal_mask(attention_mask: torch.Tensor | None, b: int, t: int, past: int, device) -> torch.Tensor:
    """[b, 1, t, T] bool: query i (column past + i) attends to the real columns ≤ its own, and
    always to its own (a padding query's row is never empty)."""
    T = past + t
    cols = torch.arange(T, device=device)
    own = (past + torch.arange(t, device=device))[:, None]  # [t, 1]
    if attention_mask is None:
        real = torch.ones(b, T, dtype=torch.bool, device=device)
    elif attention_mask.dim() == 2 and attention_mask.shape[1] == T:
        real = attention_mask.to(device).bool()
    else:
        raise ValueError(f"model.arch=mod takes a 2-D attention mask over {T} columns, "
                         f"got {tuple(attention_mask.shape)}")
    return ((cols <= own) & real[:, None, None, :]) | (cols == own)


class ModForCausalLM(ModPreTrainedModel, LlamaForCausalLM):
    """LlamaForCausalLM's head and forward over a `ModModel`."""

    def __init__(self, config: ModConfig):
        LlamaPreTrainedModel.__init__(self, config)
        self.model = ModModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


class ModForTokenClassification(GenericForTokenClassification, ModPreTrainedModel):
    """What the PPO critic is built from (a `ModModel` under `.model` and a `.score` head)."""


AutoConfig.register(ModConfig.model_type, ModConfig, exist_ok=True)
AutoModel.register(ModConfig, ModModel, exist_ok=True)
AutoModelForCausalLM.register(ModConfig, ModForCausalLM, exist_ok=True)
AutoModelForTokenClassification.register(ModConfig, ModForTokenClassification, exist_ok=True)


def build(cfg: ModelConfig, vocab_size: int, pad_id: int, bos_id: int, eos_id: int) -> ModForCausalLM:
    """A freshly initialised mixture-of-depths policy for a `model.arch: mod` section (float32)."""
    hf_cfg = ModConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size or 4 * cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
        max_position_embeddings=cfg.max_seq_len,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_embeddings,
        pad_token_id=pad_id,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        attn_implementation="sdpa",
        mod_layers=cfg.mod_layers,
        mod_capacity=cfg.mod_capacity,
        mod_threshold=cfg.mod_threshold,
        mod_coef=cfg.mod_coef,
        context_broadcast=cfg.context_broadcast,
    )
    return ModForCausalLM(hf_cfg)


def routing_stats(model: torch.nn.Module, token_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """`mod_rate_<layer>`: the share of the tokens where `token_mask` [b, t] is nonzero that ran
    each routed layer in the model's last forward. `model` may be a DeepSpeed engine."""
    inner = getattr(model, "module", model)
    inner = getattr(inner, "model", inner)
    m = token_mask.float()
    tokens = m.sum().clamp(min=1)
    tau = inner.config.mod_threshold
    return {f"mod_rate_{layer}": ((p.detach() > tau).float() * m.to(p.device)).sum() / tokens
            for layer, p in zip(inner.config.mod_layers, inner.last_probs)}


def parameter_counts(model: torch.nn.Module, rates: dict[int, float]) -> tuple[int, float]:
    """(total, expected active per token): a token runs routed layer ℓ's attention and MLP with
    probability rates[ℓ] (its router and norms always; the embedding counts once even when tied)."""
    inner = getattr(getattr(model, "module", model), "model", model)
    total = sum(p.numel() for p in model.parameters())
    idle = 0.0
    for i, layer in enumerate(inner.layers):
        if layer.router is not None:
            block = sum(p.numel() for p in (*layer.self_attn.parameters(), *layer.mlp.parameters()))
            idle += (1 - rates[i]) * block
    return total, total - idle


def flops_per_token(config: ModConfig, rates: dict[int, float], context: int) -> dict[str, float]:
    """Forward FLOPs per token (a multiply-add = 2) at `context` keys, the LM head left out, at the
    routing rates `rates` {layer: share of tokens that run it}:

        dense      every layer run by every token (the Llama of the same size)
        mod        as this forward runs: routed layers project and run the MLP for the routed
                   share only; attention scores for every query against every column; routers
        mod_ideal  also the attention scores only between routed queries and routed keys
    """
    C, F_, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    H, KV, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    proj = 2 * C * (H + 2 * KV) * D + 2 * H * D * C  # q, k, v, o
    mlp = 2 * 3 * C * F_
    scores = 2 * 2 * H * D * context  # q·k and p·v
    dense = L * (proj + mlp + scores)
    mod = ideal = dense
    for layer in config.mod_layers:
        r = rates[layer]
        mod += 2 * C - (1 - r) * (proj + mlp)
        ideal += 2 * C - (1 - r) * (proj + mlp) - (1 - r * r) * scores
    return {"dense": float(dense), "mod": float(mod), "mod_ideal": float(ideal)}
