"""The dense backbone's cached inference forward (`LlamaDecoder`) and what every backbone's
forward shares: the `Decoder` protocol and `LayerWeights`.

A decoder computes the same logits as the model in fewer tensor ops: small policies are bound by
per-op overhead, so the forward is most of a decode step (tests/test_engine.py checks it against
the model's own forward). A new backbone's forward (mixture of depths, routed attention, ...) is
one more file in rollout/decoders/ with a class of the same four members, appended to
`DECODERS` in rollout/decoders/__init__.py:

    supports(model) -> bool              # static: this class can run `model`
    __init__(model, compile_attention)   # keeps the model; weights are read by refresh()
    refresh()                            # re-read the weights if any parameter changed
    __call__(input_ids, position_ids, kv_layers, mask, segments=None) -> logits [n, V]

Shapes in the comments: n rows, t new tokens per row, T cached + new columns, C hidden size,
H query heads, KV key/value heads, D head dim, V vocabulary.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from agents.broadcast import add_uniform, allowed_keys, uniform_weights
from rollout.kernels import compiled_decode_attention, onednn_linear_works, pick_decode_attention, sdpa

# oneDNN's linear ops on prepacked weights (None in builds without them; `onednn_linear_works` says)
_linear_pointwise = getattr(torch.ops.mkldnn, "_linear_pointwise", None)  # act(x @ w.T + b)
_linear_binary = getattr(_linear_pointwise, "binary", None)  # (x @ w.T + b) <op> other, op: add | mul


class Decoder(Protocol):
    """What the engine needs of a backbone's forward (see the module docstring)."""

    @staticmethod
    def supports(model: PreTrainedModel) -> bool: ...

    def refresh(self) -> None: ...

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, kv_layers: Sequence,
                 mask: torch.Tensor, segments: Sequence[tuple[int, int, int]] | None = None) -> torch.Tensor: ...


@dataclass
class LayerWeights:
    """One Llama decoder layer's weights as the forward uses them: matrices are [out, in], or
    oneDNN-prepacked copies of them (an opaque layout) when the decoder runs on oneDNN."""

    attn_norm: torch.Tensor  # [C] RMSNorm before attention
    attn_norm_eps: float
    qkv: torch.Tensor  # [(H + 2 KV) D, C]: q, k and v stacked, so one matmul
    qkv_bias: torch.Tensor | None
    o: torch.Tensor  # [C, H D]
    o_bias: torch.Tensor | None
    attn_scale: float  # the model's softmax scale, 1 / sqrt(D)
    mlp_norm: torch.Tensor  # [C] RMSNorm before the MLP
    mlp_norm_eps: float
    # MLP: down(silu(gate(h)) * up(h)). oneDNN fuses silu and the product into the gate and up
    # matmuls, so it keeps them apart; F.linear runs them as one matmul over the stacked weights.
    gate: torch.Tensor | None  # [F, C] (oneDNN)
    gate_bias: torch.Tensor | None
    up: torch.Tensor | None  # [F, C] (oneDNN)
    up_bias: torch.Tensor | None
    gate_up: torch.Tensor | None  # [2 F, C]: gate and up stacked (F.linear)
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor  # [C, F]
    down_bias: torch.Tensor | None


class LlamaDecoder:
    """The cached forward of Llama-architecture models (what `agents.model.build_model` makes).

    Same math as transformers' LlamaForCausalLM (it reuses the model's rotary module), in about
    half the tensor ops and without per-module hooks: RoPE is applied to q and k at once, the
    attention mask comes in as an additive bias made once per call, and only the last position
    goes through the LM head.

    On CPU the matmuls go through oneDNN with weights prepacked once, with SiLU, the gate product
    and the residual adds fused into them: on the decode shapes that is much faster than
    `F.linear` (docs/rollout.md). Elsewhere q/k/v and gate/up run as single `F.linear`s over
    stacked weights. Packed and stacked weights are copies, rebuilt by `refresh` whenever a
    parameter of the model changes (tracked by tensor version counters, so in-place optimizer
    steps are seen).
    """

    _PACK_BATCH = 32  # oneDNN's blocking hint: rows per matmul (decode batch); any row count works

    def __init__(self, model: PreTrainedModel, compile_attention: bool | None = None):
        cfg = model.config
        self.model = model
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = model.model.layers[0].self_attn.head_dim
        self.rotary = model.model.rotary_emb
        p = next(model.parameters())
        self.onednn = p.device.type == "cpu" and onednn_linear_works(p.dtype)
        # Decode steps (one query per row) may use the compiled attention. None = on CPU in 16-bit
        # precision where it is faster than SDPA on this CPU (timed once: it is on an AMD EPYC, not
        # on an Intel Xeon with AMX); in fp32 the compiled call's fixed overhead eats the gain on
        # small models, and CUDA's SDPA kernels are fine. Multi-token prefill keeps SDPA.
        self.attention_choice = "sdpa"
        if compile_attention is None and p.device.type == "cpu" and p.dtype in (torch.bfloat16, torch.float16):
            self.attend_one, self.attention_choice = pick_decode_attention(
                p.dtype, self.n_heads, self.n_kv, self.head_dim)
        else:
            self.attend_one = compiled_decode_attention(p.dtype) if compile_attention else None
            if self.attend_one is not None:
                self.attention_choice = "compiled (compile_attention=True)"
        self._key = None  # the parameters' (pointer, version) when the weights were last read
        # model.context_broadcast (agents/broadcast.py): each head adds the mean of the cached values
        # over the keys its mask allows; the weights [n, 1, t, T] are made once per call
        self.context_broadcast = bool(getattr(cfg, "context_broadcast", False))
        self._uniform: torch.Tensor | None = None

    @staticmethod
    def supports(model: PreTrainedModel) -> bool:
        cfg = getattr(model, "config", None)
        return (
            getattr(cfg, "model_type", None) in ("llama", "turnstile_llama")  # the latter: context_broadcast
            and getattr(cfg, "hidden_act", None) == "silu"
            and getattr(cfg, "pretraining_tp", 1) in (1, None)
            and hasattr(model, "model") and hasattr(model, "lm_head")
        )

    # -- weights ------------------------------------------------------------------------------
    @torch.no_grad()
    def refresh(self) -> None:
        """Re-read the model's weights if any parameter changed since the last call."""
        key = tuple((p.data_ptr(), p._version) for p in self.model.parameters())
        if key == self._key:
            return
        self._key = key
        inner = self.model.model
        self.embed = inner.embed_tokens.weight  # [V, C]
        self.layers = [self._layer_weights(layer) for layer in inner.layers]
        self.norm, self.norm_eps = inner.norm.weight, inner.norm.variance_epsilon
        self.lm_head, self.lm_bias = self._pack(self.model.lm_head.weight), self.model.lm_head.bias  # [V, C]

    def _pack(self, w: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._reorder_linear_weight(w.detach(), self._PACK_BATCH) if self.onednn else w

    def _layer_weights(self, layer, mlp=None) -> LayerWeights:
        """`mlp`: the SwiGLU MLP whose weights fill the MLP fields (None = the layer's own)."""
        a, mlp = layer.self_attn, mlp if mlp is not None else layer.mlp
        separate = self.onednn  # gate and up: two fused oneDNN matmuls, or one stacked F.linear
        return LayerWeights(
            attn_norm=layer.input_layernorm.weight, attn_norm_eps=layer.input_layernorm.variance_epsilon,
            qkv=self._pack(_stack(a.q_proj.weight, a.k_proj.weight, a.v_proj.weight)),
            qkv_bias=_stack(a.q_proj.bias, a.k_proj.bias, a.v_proj.bias),
            o=self._pack(a.o_proj.weight), o_bias=a.o_proj.bias,
            attn_scale=a.scaling,
            mlp_norm=layer.post_attention_layernorm.weight,
            mlp_norm_eps=layer.post_attention_layernorm.variance_epsilon,
            gate=self._pack(mlp.gate_proj.weight) if separate else None,
            gate_bias=mlp.gate_proj.bias if separate else None,
            up=self._pack(mlp.up_proj.weight) if separate else None,
            up_bias=mlp.up_proj.bias if separate else None,
            gate_up=None if separate else _stack(mlp.gate_proj.weight, mlp.up_proj.weight),
            gate_up_bias=None if separate else _stack(mlp.gate_proj.bias, mlp.up_proj.bias),
            down=self._pack(mlp.down_proj.weight), down_bias=mlp.down_proj.bias,
        )

    # -- forward ------------------------------------------------------------------------------
    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, kv_layers: Sequence,
                 mask: torch.Tensor, segments: Sequence[tuple[int, int, int]] | None = None) -> torch.Tensor:
        """input_ids, position_ids [n, t]; kv_layers: one object per layer whose `update(k, v)` stores
        the new keys/values and returns all of them ([n, KV, T, D] each); mask [n, 1, t, T]: an
        additive bias (0 / -inf) or bool (True = attend); segments: optional (first row, end row,
        first column) groups whose attention reads the cache from that column on (the columns
        before it are padding for all their rows). Returns the logits of the last position [n, V]."""
        x = F.embedding(input_ids, self.embed)  # [n, t, C]
        cos, sin = self._rope(x, position_ids)  # [n, t, 1, D] each
        self._uniform = self._uniform_weights(mask, x.dtype) if self.context_broadcast else None
        # one query per row (decode steps, a prefill group of one-token suffixes) may take the
        # compiled kernel; longer prefills always SDPA
        attend = self.attend_one if input_ids.shape[1] == 1 and self.attend_one is not None else sdpa
        for w, kv in zip(self.layers, kv_layers):
            x = self._attention_block(x, w, kv, cos, sin, mask, segments, attend)
            x = self._mlp_block(x, w)
        x = F.rms_norm(x[:, -1], (x.shape[-1],), self.norm, self.norm_eps)  # [n, C]
        if self.onednn:
            return _linear_pointwise(x, self.lm_head, self.lm_bias, "none", [], "")
        return F.linear(x, self.lm_head, self.lm_bias)  # [n, V]

    def _rope(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [n, t, 1, D] for `rotate(v) = v * cos + roll(v, D/2) * sin`: transformers'
        rotate_half(v) * sin equals roll(v, D/2) * sin with the first half of sin negated."""
        half = self.head_dim // 2
        cos, sin = self.rotary(x, position_ids)  # [n, t, D]
        sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
        return cos[:, :, None], sin[:, :, None]  # broadcast over heads

    def _uniform_weights(self, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """context_broadcast: uniform attention weights [n, 1, t, T] over the keys `mask` allows."""
        return uniform_weights(allowed_keys(mask, mask.shape[-2], mask.shape[-1], mask.device), dtype)

    @staticmethod
    def _broadcast(o: torch.Tensor, weights: torch.Tensor, values: torch.Tensor, segments) -> torch.Tensor:
        """o [n, H, t, D] + the mean of `values` [n, KV, T, D] under `weights` (context_broadcast),
        by the attention's row groups when it has them (the columns a group skips weigh 0)."""
        if segments is None:
            return add_uniform(o, weights, values)
        return torch.cat([add_uniform(o[a:b], weights[a:b, :, :, c:], values[a:b, :, c:]) for a, b, c in segments])

    def _attention_block(self, x, w: LayerWeights, kv, cos, sin, mask, segments, attend) -> torch.Tensor:
        """x + attention(rms_norm(x)), storing this layer's new keys and values in `kv`."""
        n, t, C = x.shape
        H, KV, D = self.n_heads, self.n_kv, self.head_dim
        h = F.rms_norm(x, (C,), w.attn_norm, w.attn_norm_eps)
        if self.onednn:
            qkv = _linear_pointwise(h, w.qkv, w.qkv_bias, "none", [], "")
        else:
            qkv = F.linear(h, w.qkv, w.qkv_bias)
        qkv = qkv.view(n, t, H + 2 * KV, D)
        qk = qkv[:, :, : H + KV]  # RoPE turns q and k at once
        qk = torch.addcmul(qk * cos, qk.roll(D // 2, dims=-1), sin).transpose(1, 2)  # [n, H + KV, t, D]
        keys, values = kv.update(qk[:, H:], qkv[:, :, H + KV :].transpose(1, 2))  # [n, KV, T, D] each
        q = qk[:, :H]  # [n, H, t, D]
        if segments is None:
            o = attend(q, keys, values, mask, w.attn_scale)
        else:
            o = torch.cat([
                attend(q[a:b], keys[a:b, :, c:], values[a:b, :, c:], mask[a:b, :, :, c:], w.attn_scale)
                for a, b, c in segments
            ])  # [n, H, t, D]
        if self._uniform is not None:
            o = self._broadcast(o, self._uniform, values, segments)
        o = o.transpose(1, 2).reshape(n, t, H * D)
        if self.onednn:
            return _linear_binary(o, x, w.o, w.o_bias, "add")  # x + o_proj(o), one fused op
        return x + F.linear(o, w.o, w.o_bias)

    def _mlp_block(self, x: torch.Tensor, w: LayerWeights) -> torch.Tensor:
        """x + down(silu(gate(h)) * up(h)), h = rms_norm(x)."""
        h = F.rms_norm(x, (x.shape[-1],), w.mlp_norm, w.mlp_norm_eps)
        return self._swiglu(h, w, residual=x)

    def _swiglu(self, h: torch.Tensor, w: LayerWeights, residual: torch.Tensor | None = None) -> torch.Tensor:
        """down(silu(gate(h)) * up(h)), plus `residual` when given (fused into the last matmul on oneDNN)."""
        if self.onednn:
            gate = _linear_pointwise(h, w.gate, w.gate_bias, "swish", [], "")  # silu(gate(h))
            act = _linear_binary(h, gate, w.up, w.up_bias, "mul")  # silu(gate(h)) * up(h)
            if residual is None:
                return _linear_pointwise(act, w.down, w.down_bias, "none", [], "")
            return _linear_binary(act, residual, w.down, w.down_bias, "add")  # residual + down(act)
        gate, up = F.linear(h, w.gate_up, w.gate_up_bias).chunk(2, dim=-1)  # [n, t, F] each
        out = F.linear(F.silu(gate) * up, w.down, w.down_bias)
        return out if residual is None else residual + out


def _stack(*tensors: torch.Tensor | None) -> torch.Tensor | None:
    """Weights (or biases) of projections that read the same input, stacked on the output dim."""
    return None if tensors[0] is None else torch.cat(tensors)
