"""The cached forward of the `monarch` backbone (agents/monarch.py): Llama's forward with each
Monarch linear run as its two batched block matmuls. Shapes as in rollout/decoders/llama.py."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from agents.monarch import MonarchLinear, monarch_multiply
from rollout.decoders.llama import LayerWeights, LlamaDecoder


@dataclass
class MonarchGroup:
    """G Monarch linears of one shape that read the same input (q/k/v, gate/up), factors stacked
    so the group costs the two bmm of one: R [b, G q, p], L [G b, s, q], bias [G m] or None."""

    R: torch.Tensor
    L: torch.Tensor
    bias: torch.Tensor | None
    groups: int

    @staticmethod
    def of(*linears: MonarchLinear) -> MonarchGroup:
        biases = [lin.bias for lin in linears]
        return MonarchGroup(
            R=torch.cat([lin.R for lin in linears], dim=1) if len(linears) > 1 else linears[0].R,
            L=torch.cat([lin.L for lin in linears], dim=0) if len(linears) > 1 else linears[0].L,
            bias=None if biases[0] is None else torch.cat(biases),
            groups=len(linears),
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = monarch_multiply(x, self.R, self.L, self.groups)  # [..., G m]
        return y if self.bias is None else y + self.bias


def _groups(*linears: MonarchLinear) -> list[MonarchGroup]:
    """Consecutive linears of the same shape as one group each (q/k/v is one group unless
    grouped-query attention makes k/v narrower than q: then q, and k/v)."""
    out: list[list[MonarchLinear]] = []
    for lin in linears:
        shape = (lin.in_features, lin.out_features, lin.nblocks, lin.rank, lin.bias is not None)
        if out and (out[-1][0].in_features, out[-1][0].out_features, out[-1][0].nblocks, out[-1][0].rank,
                    out[-1][0].bias is not None) == shape:
            out[-1].append(lin)
        else:
            out.append([lin])
    return [MonarchGroup.of(*group) for group in out]


@dataclass
class MonarchLayerWeights(LayerWeights):
    """A monarch layer: LayerWeights' dense fields for what stays dense (attention unless
    monarch_attention; the MLP fields are None), and the Monarch groups."""

    gate_up_m: MonarchGroup  # gate and up: one group, output [.., 2 F]
    down_m: MonarchGroup
    qkv_m: list[MonarchGroup] | None  # None: attention is dense (LayerWeights.qkv / .o)
    o_m: MonarchGroup | None


class MonarchDecoder(LlamaDecoder):
    """The cached forward of `turnstile_monarch` models (`model.arch: monarch`): LlamaDecoder's
    attention, RoPE, KV cache, segments and LM head; every Monarch linear as monarch_multiply's
    two torch.bmm over blocks (gate/up as one stacked pair, q/k/v too when they are Monarch).
    Dense matmuls that remain (attention when monarch_attention is off, the LM head) keep
    LlamaDecoder's oneDNN prepacking on CPU; Monarch factors are used as they are (no packing:
    oneDNN's linear ops take a dense [out, in] weight)."""

    @staticmethod
    def supports(model: PreTrainedModel) -> bool:
        cfg = getattr(model, "config", None)
        return (
            getattr(cfg, "model_type", None) == "turnstile_monarch"
            and getattr(cfg, "hidden_act", None) == "silu"
            and hasattr(model, "model") and hasattr(model, "lm_head")
        )

    def _layer_weights(self, layer) -> MonarchLayerWeights:
        a, mlp = layer.self_attn, layer.mlp
        monarch_attention = isinstance(a.q_proj, MonarchLinear)
        if monarch_attention:
            qkv = qkv_bias = o = o_bias = None
        else:  # LlamaDecoder's dense attention weights, packed for oneDNN where it runs
            qkv = self._pack(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
            qkv_bias = None if a.q_proj.bias is None else torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
            o, o_bias = self._pack(a.o_proj.weight), a.o_proj.bias
        return MonarchLayerWeights(
            attn_norm=layer.input_layernorm.weight, attn_norm_eps=layer.input_layernorm.variance_epsilon,
            qkv=qkv, qkv_bias=qkv_bias, o=o, o_bias=o_bias, attn_scale=a.scaling,
            mlp_norm=layer.post_attention_layernorm.weight,
            mlp_norm_eps=layer.post_attention_layernorm.variance_epsilon,
            gate=None, gate_bias=None, up=None, up_bias=None, gate_up=None, gate_up_bias=None,
            down=None, down_bias=None,
            gate_up_m=MonarchGroup.of(mlp.gate_proj, mlp.up_proj), down_m=MonarchGroup.of(mlp.down_proj),
            qkv_m=_groups(a.q_proj, a.k_proj, a.v_proj) if monarch_attention else None,
            o_m=MonarchGroup.of(a.o_proj) if monarch_attention else None,
        )

    def _attention_block(self, x, w: MonarchLayerWeights, kv, cos, sin, mask, segments, attend) -> torch.Tensor:
        if w.qkv_m is None:
            return super()._attention_block(x, w, kv, cos, sin, mask, segments, attend)
        # LlamaDecoder._attention_block with the q/k/v and o matmuls Monarch
        n, t, C = x.shape
        H, KV, D = self.n_heads, self.n_kv, self.head_dim
        h = F.rms_norm(x, (C,), w.attn_norm, w.attn_norm_eps)
        qkv = torch.cat([group(h) for group in w.qkv_m], dim=-1) if len(w.qkv_m) > 1 else w.qkv_m[0](h)
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
        if self._uniform is not None:  # context_broadcast
            o = self._broadcast(o, self._uniform, values, segments)
        return x + w.o_m(o.transpose(1, 2).reshape(n, t, H * D))

    def _mlp_block(self, x: torch.Tensor, w: MonarchLayerWeights) -> torch.Tensor:
        """x + down(silu(gate(h)) * up(h)), h = rms_norm(x), every matmul Monarch."""
        h = F.rms_norm(x, (x.shape[-1],), w.mlp_norm, w.mlp_norm_eps)
        gate, up = w.gate_up_m(h).chunk(2, dim=-1)  # [n, t, F] each
        return x + w.down_m(F.silu(gate) * up)
