"""The cached forward of the `routed_attention` backbone (agents/routed_attention.py): Llama's
layers with the attention reading only the keys the router keeps, plus LePE. Shapes as in
rollout/decoders/llama.py; Nr regions, K the LePE kernel."""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from agents.broadcast import uniform_weights
from agents.routed_attention import MODEL_TYPE, RoutingPlan, broadcast_keys, local_conv, plan_routing, route
from rollout.decoders.llama import LayerWeights, LlamaDecoder, _linear_binary, _linear_pointwise
from rollout.kernels import sdpa


@dataclass
class RoutedLayerWeights(LayerWeights):
    """A routed-attention layer: Llama's weights plus LePE's conv (None when `local_conv: 0`)."""

    lepe: torch.Tensor | None  # [KV D, 1, K]
    lepe_bias: torch.Tensor | None  # [KV D]


class RoutedAttentionDecoder(LlamaDecoder):
    """The cached forward of routed-attention models: `LlamaDecoder` with the attention block
    replaced. The routing is the model's own code (`plan_routing`, `route`, `local_conv`), run on
    the cache's keys and values, so the engine and the learner compute the same function:

    * which columns are real: the mask's last query row. The engine right-aligns every row's new
      tokens, so the last query is a real token (a prompt's last, or a decode step's) and its mask
      row allows exactly the row's real columns. Each row's positions then follow from the new
      tokens' position ids and the rank of its cached real columns (they are consecutive tokens).
    * region keys: the means of the cached post-RoPE keys of each completed region, recomputed
      every call from the cache (one scatter-add over the columns per layer: O(T D), as much as
      the attention's own read of K; a running per-region sum would save it, but the cache
      holds keys only).
    * LePE: the token's value and the K-1 real values before it, gathered from the cache columns.

    The routing mask becomes an additive bias per KV head on top of the engine's mask (causality
    and padding); attention is torch's SDPA (the compiled decode kernel takes one mask row per row,
    not per head, so it is not used here).
    """

    def __init__(self, model: PreTrainedModel, compile_attention: bool | None = None):
        super().__init__(model, compile_attention)
        cfg = model.config
        self.region_size, self.top_regions, self.local_conv = cfg.region_size, cfg.top_regions, cfg.local_conv
        self.attend_one = None  # see the class docstring
        self.attention_choice = "sdpa (routed attention)"
        self._plan: RoutingPlan | None = None  # this call's, shared by its layers

    @staticmethod
    def supports(model: PreTrainedModel) -> bool:
        cfg = getattr(model, "config", None)
        return (
            getattr(cfg, "model_type", None) == MODEL_TYPE
            and getattr(cfg, "hidden_act", None) == "silu"
            and getattr(cfg, "pretraining_tp", 1) in (1, None)
            and hasattr(model, "model") and hasattr(model, "lm_head")
        )

    def _layer_weights(self, layer) -> RoutedLayerWeights:
        dense = super()._layer_weights(layer)
        conv = layer.self_attn.lepe
        return RoutedLayerWeights(
            **{f.name: getattr(dense, f.name) for f in fields(LayerWeights)},
            lepe=None if conv is None else conv.weight, lepe_bias=None if conv is None else conv.bias,
        )

    def __call__(self, input_ids, position_ids, kv_layers, mask, segments=None) -> torch.Tensor:
        # real columns: the last query's mask row (see the class docstring); additive (0 / -inf) or bool
        last = mask[:, 0, -1, :]
        key_valid = last if last.dtype == torch.bool else last == 0  # [n, T]
        self._plan = plan_routing(key_valid, position_ids, self.region_size, self.local_conv)
        try:
            return super().__call__(input_ids, position_ids, kv_layers, mask, segments)
        finally:
            self._plan = None

    def _uniform_weights(self, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """context_broadcast: the mean over every past real key, routed or not (routed_attention.broadcast_keys)."""
        return uniform_weights(broadcast_keys(self._plan), dtype)

    def _attention_block(self, x, w: RoutedLayerWeights, kv, cos, sin, mask, segments, attend) -> torch.Tensor:
        """x + o_proj(routed attention + LePE), storing this layer's new keys and values in `kv`."""
        n, t, C = x.shape
        H, KV, D = self.n_heads, self.n_kv, self.head_dim
        h = F.rms_norm(x, (C,), w.attn_norm, w.attn_norm_eps)
        if self.onednn:
            qkv = _linear_pointwise(h, w.qkv, w.qkv_bias, "none", [], "")
        else:
            qkv = F.linear(h, w.qkv, w.qkv_bias)
        qkv = qkv.view(n, t, H + 2 * KV, D)
        qk = qkv[:, :, : H + KV]
        qk = torch.addcmul(qk * cos, qk.roll(D // 2, dims=-1), sin).transpose(1, 2)  # [n, H + KV, t, D]
        keys, values = kv.update(qk[:, H:], qkv[:, :, H + KV :].transpose(1, 2))  # [n, KV, T, D] each
        q = qk[:, :H]  # [n, H, t, D]
        T = keys.shape[2]
        plan = self._plan
        # the engine's mask (causality, padding) minus the real keys the router dropped, per KV head
        dropped = plan.key_valid[:, None, None, :] & ~route(q, keys, plan, self.top_regions)  # [n, KV, t, T]
        bias = mask if mask.dtype != torch.bool else torch.zeros(mask.shape, dtype=q.dtype, device=q.device) \
            .masked_fill_(~mask, float("-inf"))
        bias = bias.expand(n, KV, t, T).masked_fill(dropped, float("-inf"))
        bias = bias[:, :, None].expand(n, KV, H // KV, t, T).reshape(n, H, t, T)
        if segments is None:
            o = sdpa(q, keys, values, bias, w.attn_scale)
        else:
            o = torch.cat([
                sdpa(q[a:b], keys[a:b, :, c:], values[a:b, :, c:], bias[a:b, :, :, c:], w.attn_scale)
                for a, b, c in segments
            ])  # [n, H, t, D]
        if w.lepe is not None:  # the token's and the K-1 previous real values, gathered by column
            o = o + local_conv(values, plan, w.lepe, w.lepe_bias).repeat_interleave(H // KV, dim=1)
        if self._uniform is not None:  # context_broadcast
            o = self._broadcast(o, self._uniform, values, segments)
        o = o.transpose(1, 2).reshape(n, t, H * D)
        if self.onednn:
            return _linear_binary(o, x, w.o, w.o_bias, "add")  # x + o_proj(o), one fused op
        return x + F.linear(o, w.o, w.o_bias)
