"""The cached forward of the `mod` backbone (agents/mod.py): Llama layers, some of them routed
(mixture of depths). Shapes as in rollout/decoders/llama.py; N = n t tokens, r of them routed."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from agents.broadcast import allowed_keys, uniform_weights
from agents.mod import SKIPPED_VALUE, skipped_columns
from rollout.decoders.llama import LayerWeights, LlamaDecoder, _linear_pointwise
from rollout.kernels import sdpa


@dataclass
class ModLayerWeights(LayerWeights):
    """A Llama layer's weights plus its router (None in a layer every token runs)."""

    router: torch.Tensor | None  # [1, C]
    router_bias: torch.Tensor | None  # [1]


class ModDecoder(LlamaDecoder):
    """The cached forward of mixture-of-depths models (`model.arch: mod`). Dense layers are
    LlamaDecoder's; in a routed layer

        p = σ(w · rms_norm(x) + b)  (fp32),  run = p > τ
        x' = x + p · (a + m)  for the routed tokens,  x' = x  for the others

    with q/k/v, the output projection and the MLP computed for the routed tokens only (gathered
    from the n × t grid, scattered back). A skipped token still takes its cache column, written
    as key 0 / value SKIPPED_VALUE: every later read of that layer's cache (this call's, a later
    decode step's, a later turn's through a stored session) masks it out, which is how "a skipped
    token leaves no K/V" survives the engine's compaction and session reuse unchanged. The math
    and op order are agents.mod's (tests/test_mod.py checks tokens and log-probs against it).
    """

    def __init__(self, model: PreTrainedModel, compile_attention: bool | None = None):
        super().__init__(model, compile_attention)
        self.threshold = model.config.mod_threshold

    @staticmethod
    def supports(model: PreTrainedModel) -> bool:
        cfg = getattr(model, "config", None)
        return (
            getattr(cfg, "model_type", None) == "turnstile_mod"
            and getattr(cfg, "hidden_act", None) == "silu"
            and getattr(cfg, "pretraining_tp", 1) in (1, None)
            and hasattr(model, "model") and hasattr(model, "lm_head")
        )

    def _layer_weights(self, layer) -> ModLayerWeights:
        dense = super()._layer_weights(layer)
        router = layer.router
        return ModLayerWeights(
            **{f.name: getattr(dense, f.name) for f in fields(LayerWeights)},
            router=None if router is None else router.weight,
            router_bias=None if router is None else router.bias,
        )

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, kv_layers: Sequence,
                 mask: torch.Tensor, segments: Sequence[tuple[int, int, int]] | None = None) -> torch.Tensor:
        x = F.embedding(input_ids, self.embed)  # [n, t, C]
        cos, sin = self._rope(x, position_ids)
        self._uniform = self._uniform_weights(mask, x.dtype) if self.context_broadcast else None  # dense layers'
        attend = self.attend_one if input_ids.shape[1] == 1 and self.attend_one is not None else sdpa
        for w, kv in zip(self.layers, kv_layers):
            if w.router is None:
                x = self._attention_block(x, w, kv, cos, sin, mask, segments, attend)
                x = self._mlp_block(x, w)
            else:
                x = self._routed_layer(x, w, kv, cos, sin, mask, segments, attend)
        x = F.rms_norm(x[:, -1], (x.shape[-1],), self.norm, self.norm_eps)  # [n, C]
        return self._linear(x, self.lm_head, self.lm_bias)  # [n, V]

    def _linear(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if self.onednn:
            return _linear_pointwise(x, w, b, "none", [], "")
        return F.linear(x, w, b)

    def _routed_layer(self, x, w: ModLayerWeights, kv, cos, sin, mask, segments, attend) -> torch.Tensor:
        """One routed layer: attention and MLP for the tokens whose router says run, the residual for
        the others; every token's column of `kv` is written (a skipped one's with the marker)."""
        n, t, C = x.shape
        H, KV, D = self.n_heads, self.n_kv, self.head_dim
        h = F.rms_norm(x, (C,), w.attn_norm, w.attn_norm_eps)  # [n, t, C]
        p = torch.sigmoid(F.linear(h.float(), w.router.float(), w.router_bias.float())).view(n, t)  # fp32
        run = p > self.threshold  # [n, t]
        route = run.flatten().nonzero().squeeze(1)  # [r] routed tokens of the n t grid
        everyone = len(route) == n * t  # (a fresh model's routers run every token): no gather, no scatter
        h = h.view(n * t, C)
        if everyone:
            qkv = self._linear(h, w.qkv, w.qkv_bias)
        else:
            qkv = h.new_zeros(n * t, (H + 2 * KV) * D)
            if len(route):
                qkv.index_copy_(0, route, self._linear(h[route], w.qkv, w.qkv_bias))
        qkv = qkv.view(n, t, H + 2 * KV, D)
        if not everyone:
            qkv[:, :, H + KV :].masked_fill_(~run[:, :, None, None], SKIPPED_VALUE)  # skipped: key 0, value marked
        qk = qkv[:, :, : H + KV]
        qk = torch.addcmul(qk * cos, qk.roll(D // 2, dims=-1), sin).transpose(1, 2)  # [n, H + KV, t, D]
        keys, values = kv.update(qk[:, H:], qkv[:, :, H + KV :].transpose(1, 2))  # [n, KV, T, D] each
        if not len(route):
            return x
        # earlier tokens' skipped columns (this call's, or cached) are out of every query's reach
        T = keys.shape[2]
        own = torch.arange(T, device=x.device) == (T - t + torch.arange(t, device=x.device))[:, None]  # [t, T]
        gone = skipped_columns(values)[:, None, None, :] & ~own  # [n, 1, t, T]: skipped keys, not one's own
        mask = mask & ~gone if mask.dtype == torch.bool else mask.masked_fill(gone, float("-inf"))
        q = qk[:, :H]  # [n, H, t, D]
        if segments is None:
            o = attend(q, keys, values, mask, w.attn_scale)
        else:
            o = torch.cat([
                attend(q[a:b], keys[a:b, :, c:], values[a:b, :, c:], mask[a:b, :, :, c:], w.attn_scale)
                for a, b, c in segments
            ])  # [n, H, t, D]
        if self.context_broadcast:  # the mean over this layer's keys: the skipped columns are out of it too
            o = self._broadcast(o, uniform_weights(allowed_keys(mask, t, T, x.device), x.dtype), values, segments)
        o = o.transpose(1, 2).reshape(n * t, H * D)
        x = x.reshape(n * t, C)
        x_r, p = (x, p.view(n * t)) if everyone else (x[route], p.flatten()[route])  # skipped queries dropped
        a = self._linear(o if everyone else o[route], w.o, w.o_bias)  # [r, C]
        m = self._swiglu(F.rms_norm(x_r + a, (C,), w.mlp_norm, w.mlp_norm_eps), w)  # [r, C]
        scale = p[:, None].to(x.dtype)  # [r, 1]
        if everyone:
            return (x + scale * (a + m)).view(n, t, C)
        return x.index_add(0, route, scale * (a + m)).view(n, t, C)

