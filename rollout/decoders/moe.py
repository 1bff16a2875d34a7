"""The cached forward of the `moe` backbone (agents/moe.py): Llama's attention and a routed +
shared mixture per layer, and the routing record the engine keeps for `rl.routing_replay`.
Shapes as in rollout/decoders/llama.py."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from rollout.decoders.llama import LayerWeights, LlamaDecoder


@dataclass
class MoeLayerWeights(LayerWeights):
    """A Qwen2-MoE layer: attention as in Llama; the MLP fields hold the shared expert, and these
    the router and the routed experts (docs/backbones.md). E experts, F routed expert width."""

    router: torch.Tensor  # [E, C]
    shared_gate: torch.Tensor  # [1, C]: sigmoid(shared_gate · h) scales the shared expert
    expert_gate_up: torch.Tensor  # [E, 2 F, C]: each expert's gate and up stacked
    expert_down: torch.Tensor  # [E, C, F]


class MoeDecoder(LlamaDecoder):
    """The cached forward of Qwen2-MoE models (`model.arch: moe`, agents/moe.py): Llama's
    attention (with q/k/v biases) and, per layer,

        y = x + Σ_{i ∈ top-k(p)} p_i · E_i(h) + sigmoid(w_s · h) · E_shared(h),   p = softmax(W_g h)

    the math of transformers' Qwen2-MoE (the gate's softmax in fp32, the same top-k;
    tests/test_moe.py checks tokens and log-probs against it). The shared expert runs through the
    dense SwiGLU path (oneDNN on CPU); each routed expert runs once on the rows that chose it, all
    of them in one grouped matmul where torch has one (`F.grouped_mm`; else a matmul pair per
    expert). Running every expert on every row instead costs more than the ops it saves here.
    Every call keeps the experts it chose (`routed_experts()`): the engine hands them to the
    trajectory for routing replay.
    """

    records_routing = True

    def __init__(self, model: PreTrainedModel, compile_attention: bool | None = None):
        super().__init__(model, compile_attention)
        self.top_k, self.norm_topk_prob = model.config.num_experts_per_tok, model.config.norm_topk_prob
        p = next(model.parameters())
        self.grouped_mm = grouped_mm_works(p.dtype, p.device)  # else one matmul pair per expert
        self._routed: list[torch.Tensor] = []  # this call's chosen experts, per layer [n t, k]
        self._rows = (0, 0)  # this call's (n, t)

    @staticmethod
    def supports(model: PreTrainedModel) -> bool:
        cfg = getattr(model, "config", None)
        return (
            getattr(cfg, "model_type", None) == "qwen2_moe"
            and getattr(cfg, "hidden_act", None) == "silu"
            and getattr(cfg, "decoder_sparse_step", None) == 1 and not getattr(cfg, "mlp_only_layers", None)
            and not getattr(cfg, "use_sliding_window", False)
            and getattr(cfg, "shared_expert_intermediate_size", 0) > 0
            and hasattr(model, "model") and hasattr(model, "lm_head")
        )

    def _layer_weights(self, layer) -> MoeLayerWeights:
        moe = layer.mlp
        dense = super()._layer_weights(layer, moe.shared_expert)
        return MoeLayerWeights(
            **{f.name: getattr(dense, f.name) for f in fields(LayerWeights)},
            router=moe.gate.weight, shared_gate=moe.shared_expert_gate.weight,
            expert_gate_up=moe.experts.gate_up_proj, expert_down=moe.experts.down_proj,
        )

    def __call__(self, input_ids, position_ids, kv_layers, mask, segments=None) -> torch.Tensor:
        self._routed, self._rows = [], tuple(input_ids.shape)
        return super().__call__(input_ids, position_ids, kv_layers, mask, segments)

    def routed_experts(self) -> torch.Tensor:
        """The experts the last call chose: [n, t, layers, k] (long)."""
        return torch.stack(self._routed, dim=1).view(*self._rows, len(self._routed), self.top_k)

    def _mlp_block(self, x: torch.Tensor, w: MoeLayerWeights) -> torch.Tensor:
        n, t, C = x.shape
        h = F.rms_norm(x, (C,), w.mlp_norm, w.mlp_norm_eps)
        shared = self._swiglu(h, w) * torch.sigmoid(F.linear(h, w.shared_gate))  # [n, t, C]
        return x + (self._routed_mlp(h.view(n * t, C), w).view(n, t, C) + shared)

    def _routed_mlp(self, h: torch.Tensor, w: MoeLayerWeights) -> torch.Tensor:
        """Σ over each token's top-k experts of p_i · E_i(h); h [N, C] -> [N, C]."""
        probs = torch.softmax(F.linear(h, w.router), dim=-1, dtype=torch.float32)  # [N, E]
        weights, chosen = probs.topk(self.top_k, dim=-1)  # [N, k] each
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        self._routed.append(chosen)
        return run_experts(h, weights, chosen, w.expert_gate_up, w.expert_down, self.grouped_mm)


def run_experts(h: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor, expert_gate_up: torch.Tensor,
                expert_down: torch.Tensor, grouped_mm: bool) -> torch.Tensor:
    """Σ_j weights[:, j] · E_{chosen[:, j]}(h) for SwiGLU experts: h [N, C], weights and chosen [N, k],
    expert_gate_up [E, 2 F, C] (gate and up stacked), expert_down [E, C, F] -> [N, C]. Shared by the
    routing decoders (moe, factor)."""
    top_k, num_experts = chosen.shape[-1], expert_gate_up.shape[0]
    # the N k assignments sorted by expert: expert e runs once, on the rows that chose it
    flat = chosen.flatten()  # [N k]
    order = flat.argsort(stable=True)
    rows, weights = order // top_k, weights.to(h.dtype).flatten()[order]
    counts = torch.bincount(flat, minlength=num_experts)  # [E] assignments per expert
    out = torch.zeros_like(h)
    if grouped_mm:  # every expert's rows in one grouped matmul (1.3-1.9x the loop below)
        offsets = counts.cumsum(0, dtype=torch.int32)
        gate, up = F.grouped_mm(h[rows], expert_gate_up.transpose(1, 2), offs=offsets).chunk(2, dim=-1)
        y = F.grouped_mm(F.silu(gate) * up, expert_down.transpose(1, 2), offs=offsets)  # [N k, C]
        return out.index_add_(0, rows, y * weights[:, None])
    start = 0
    for e, count in enumerate(counts.tolist()):
        if count:
            idx = rows[start : start + count]
            gate, up = F.linear(h[idx], expert_gate_up[e]).chunk(2, dim=-1)  # [count, F] each
            y = F.linear(F.silu(gate) * up, expert_down[e]) * weights[start : start + count, None]
            out.index_add_(0, idx, y)
            start += count
    return out


_GROUPED_MM: dict[tuple[torch.dtype, str], bool] = {}  # (dtype, device type) -> probe result


def grouped_mm_works(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether torch's grouped matmul (`F.grouped_mm`, torch >= 2.10) runs here and agrees with one
    matmul per group, an empty group included. Probed once per process, dtype and device type."""
    key = (dtype, torch.device(device).type)
    if key not in _GROUPED_MM:
        ok = False
        try:
            g = torch.Generator().manual_seed(0)  # leave the global RNG alone
            x, w = torch.randn(6, 16, generator=g), torch.randn(3, 16, 8, generator=g)
            x, w = x.to(device, dtype), w.to(device, dtype)
            offsets = torch.tensor([2, 2, 6], dtype=torch.int32, device=device)  # group 1 is empty
            tol = 1e-4 if dtype == torch.float32 else 0.1
            ok = torch.allclose(F.grouped_mm(x, w, offs=offsets), torch.cat([x[:2] @ w[0], x[2:] @ w[2]]),
                                atol=tol, rtol=tol)
        except Exception:  # an older torch, or no kernel for this device/dtype: the per-expert loop
            ok = False
        _GROUPED_MM[key] = ok
    return _GROUPED_MM[key]


class RoutingTrace:
    """The experts a routing decoder chose for each token one engine chunk ran, gathered per
    prompt: its uncached prompt suffix (prefill), then each fed token (decode steps) in order."""

    def __init__(self, slots: list[int]):
        self.slots = slots  # batch slot -> prompt index
        self.prefilled: list[torch.Tensor | None] = [None] * len(slots)  # per prompt [suffix, L, k]
        self.decode_rows: list[torch.Tensor] = []  # per decode call: prompt index per row [b]
        self.decoded: list[torch.Tensor] = []  # per decode call [b, L, k]

    def prefill(self, first_slot: int, lengths: Sequence[int], experts: torch.Tensor) -> None:
        """experts [g, s, L, k] of slots first_slot.. (suffixes right-aligned, `lengths` real tokens)."""
        for j, length in enumerate(lengths):
            self.prefilled[self.slots[first_slot + j]] = experts[j, experts.shape[1] - length :]

    def decode(self, rows: torch.Tensor, experts: torch.Tensor) -> None:
        """experts [b, 1, L, k] of one decode step; rows [b]: their prompt indices."""
        self.decode_rows.append(rows)
        self.decoded.append(experts[:, 0])

    def per_prompt(self, fed: Sequence[int]) -> list[torch.Tensor]:
        """Per prompt [suffix + fed, L, k]: `fed[i]` tokens of prompt i went back in (rows that finished
        early were fed until compacted out, so only each prompt's first `fed[i]` steps count)."""
        if not self.decoded:
            return [p.to(torch.int16) for p in self.prefilled]
        rows = torch.cat(self.decode_rows)
        order = torch.argsort(rows, stable=True)  # stable: each prompt's steps stay in order
        decoded = torch.cat(self.decoded)[order]
        counts = torch.bincount(rows, minlength=len(self.slots)).tolist()
        out, start = [], 0
        for i, count in enumerate(counts):
            out.append(torch.cat([self.prefilled[i], decoded[start : start + min(count, fed[i])]]).to(torch.int16))
            start += count
        return out
