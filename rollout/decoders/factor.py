"""The cached forward of the `factor` backbone (agents/factor.py): Llama's attention and, per
layer, a dense FFN cut into E slice-experts of which each token runs k. Shapes as in
rollout/decoders/llama.py; s = F / E neurons per expert."""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from agents.factor import MODEL_TYPE, route
from rollout.decoders.llama import LayerWeights, LlamaDecoder
from rollout.decoders.moe import grouped_mm_works, run_experts


@dataclass
class FactorLayerWeights(LayerWeights):
    """A factor layer: attention as in Llama, plus the router and the FFN's slices stacked per expert."""

    router: torch.Tensor  # [E, C]
    expert_gate_up: torch.Tensor  # [E, 2 s, C]: slice e of gate_proj, then of up_proj
    expert_down: torch.Tensor  # [E, C, s]: slice e of down_proj's columns


class FactorDecoder(LlamaDecoder):
    """The cached forward of FactorForCausalLM (`model.arch: factor`):

        y = x + Σ_{i ∈ top-k(p)} w_i · E_i(h),   p = softmax(W_r h),   w_i = E · p_i / Σ_{top-k} p

    with `agents.factor.route` choosing (so the learner's forward and this one route alike) and
    MoeDecoder's `run_experts` running each chosen slice once over the rows that chose it (one
    grouped matmul where torch has it): k/E of the dense FFN's matmul FLOPs, plus the router.
    Routing is not recorded (no routing replay for `factor`: rl.routing_replay is moe's).
    """

    def __init__(self, model: PreTrainedModel, compile_attention: bool | None = None):
        super().__init__(model, compile_attention)
        self.num_experts, self.top_k = model.config.num_experts, model.config.num_experts_per_tok
        p = next(model.parameters())
        self.grouped_mm = grouped_mm_works(p.dtype, p.device)  # else one matmul pair per expert

    @staticmethod
    def supports(model: PreTrainedModel) -> bool:
        cfg = getattr(model, "config", None)
        return (
            getattr(cfg, "model_type", None) == MODEL_TYPE
            and getattr(cfg, "hidden_act", None) == "silu"
            and getattr(cfg, "pretraining_tp", 1) in (1, None)
            and hasattr(model, "model") and hasattr(model, "lm_head")
        )

    def _layer_weights(self, layer) -> FactorLayerWeights:
        # The dense MLP fields get the whole FFN (LlamaDecoder fills them; unused by _mlp_block here).
        dense, mlp = super()._layer_weights(layer), layer.mlp
        E, C = self.num_experts, mlp.gate_proj.weight.shape[1]
        s = mlp.gate_proj.weight.shape[0] // E
        gate_up = torch.cat([mlp.gate_proj.weight.view(E, s, C), mlp.up_proj.weight.view(E, s, C)], dim=1)
        down = mlp.down_proj.weight.view(C, E, s).permute(1, 0, 2).contiguous()  # [E, C, s]
        return FactorLayerWeights(
            **{f.name: getattr(dense, f.name) for f in fields(LayerWeights)},
            router=mlp.router.weight, expert_gate_up=gate_up.detach(), expert_down=down.detach(),
        )

    def _mlp_block(self, x: torch.Tensor, w: FactorLayerWeights) -> torch.Tensor:
        n, t, C = x.shape
        h = F.rms_norm(x, (C,), w.mlp_norm, w.mlp_norm_eps).view(n * t, C)
        _, weights, chosen = route(F.linear(h, w.router), self.top_k)  # [N, k] each
        y = run_experts(h, weights, chosen, w.expert_gate_up, w.expert_down, self.grouped_mm)  # [N, C]
        return x + y.view(n, t, C)
