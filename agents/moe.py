"""The `moe` backbone: routed experts plus a shared expert (DiT-MoE), as a Qwen2-MoE model.

Every decoder layer's MLP is a mixture (docs/backbones.md has the equations and what differs from
the paper):

    s = softmax(W_g h)                                   gate over E experts, h [C] a token
    y = Σ_{i ∈ top-k(s)} s_i · E_i(h) + σ(w_s · h) · E_shared(h)

with SwiGLU experts, top-k weights not renormalised (`norm_topk_prob=False`). Built on
transformers' Qwen2MoeForCausalLM so the checkpoint folder is one vLLM serves.

Also here, for the learners: `RouterTap` (records each layer's router logits and chosen experts
during a forward, and optionally replays recorded choices: routing replay), `balance_loss` (the
paper's α · E · Σ_i P_i f_i) and parameter counts (total and active per token).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

try:  # transformers 5 has Qwen2-MoE's router and stacked experts as modules (what this file reads)
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock, Qwen2MoeTopKRouter
except ImportError:  # transformers 4: no `moe` arch, and a dense model has no routers anyway
    Qwen2MoeSparseMoeBlock = Qwen2MoeTopKRouter = None

if TYPE_CHECKING:
    from agents.model import ModelConfig


def moe_sizes(cfg: ModelConfig) -> tuple[int, int]:
    """(routed expert width, shared expert width) of a `model.arch: moe` section."""
    return cfg.expert_size or cfg.hidden_size, cfg.shared_expert_size or 2 * cfg.hidden_size


def build(cfg: ModelConfig, vocab_size: int, pad_id: int, bos_id: int, eos_id: int) -> Qwen2MoeForCausalLM:
    """A freshly initialised Qwen2-MoE policy for a `model.arch: moe` section (float32)."""
    if Qwen2MoeTopKRouter is None:
        raise RuntimeError("model.arch=moe needs transformers >= 5 (its Qwen2-MoE router and experts modules)")
    expert, shared = moe_sizes(cfg)
    hf_cfg = Qwen2MoeConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=shared,  # read only by dense layers, and every layer here is sparse
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
        max_position_embeddings=cfg.max_seq_len,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_embeddings,
        num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k,
        moe_intermediate_size=expert,
        shared_expert_intermediate_size=shared,
        norm_topk_prob=False,  # the paper's gate: top-k softmax weights as they are
        decoder_sparse_step=1,  # every layer a mixture
        mlp_only_layers=[],
        router_aux_loss_coef=cfg.balance_coef,  # a record only: our loss is balance_loss (not transformers')
        output_router_logits=False,  # RouterTap reads the routers
        qkv_bias=True,  # vLLM's Qwen2-MoE attention always has q/k/v biases
        pad_token_id=pad_id,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        attn_implementation="sdpa",
    )
    return Qwen2MoeForCausalLM(hf_cfg)


def routers(model: torch.nn.Module) -> list[Qwen2MoeTopKRouter]:
    """The model's routers in layer order (empty for a dense model). `model` may be a DeepSpeed engine."""
    if Qwen2MoeTopKRouter is None:
        return []
    return [m for m in getattr(model, "module", model).modules() if isinstance(m, Qwen2MoeTopKRouter)]


def is_moe(model: torch.nn.Module) -> bool:
    return bool(routers(model))


class RouterTap:
    """A context manager around forwards of a (possibly) mixture-of-experts model that records,
    per layer, the router logits [N, E] and the chosen experts [N, k] of the N = batch × length
    tokens it routed (row-major over [batch, length]); on a dense model it records nothing.

    `replay` [L, N, k] (long; −1 = no record): tokens with a record are routed to those experts
    instead of the router's own top-k — verl's routing replay. Their mixture weights are still
    the router's probabilities of those experts (gradients reach the router as usual); only which
    experts run is fixed, so the learner computes the forward the sampling engine computed.
    """

    def __init__(self, model: torch.nn.Module, replay: torch.Tensor | None = None):
        self.routers = routers(model)
        self.replay = replay
        self.logits: list[torch.Tensor] = []  # per layer [N, E]
        self.chosen: list[torch.Tensor] = []  # per layer [N, k]
        self._handles = []
        if replay is not None and replay.shape[0] != len(self.routers):
            raise ValueError(f"routing replay for {replay.shape[0]} layers, the model routes in {len(self.routers)}")

    def __enter__(self) -> RouterTap:
        for layer, router in enumerate(self.routers):
            self._handles.append(router.register_forward_hook(self._hook(layer)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, layer: int):
        def hook(router: Qwen2MoeTopKRouter, args, out):
            logits, weights, chosen = out  # [N, E], [N, k], [N, k]
            if self.replay is not None:
                recorded = self.replay[layer].to(chosen.device)
                chosen = torch.where(recorded >= 0, recorded, chosen)
                weights = torch.softmax(logits.float(), dim=-1).gather(-1, chosen)
                if router.norm_topk_prob:
                    weights = weights / weights.sum(-1, keepdim=True)
                weights = weights.to(logits.dtype)
            self.logits.append(logits)
            self.chosen.append(chosen)
            return logits, weights, chosen

        return hook

    def balance_loss(self, token_mask: torch.Tensor, coef: float) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(coef · balance loss, per-expert load [E]) over the tokens where `token_mask` [batch,
        length] is nonzero, from the last forward (None on a dense model)."""
        if not self.logits:
            return None
        n = self.logits[0].shape[0]
        return balance_loss(self.logits[-len(self.routers):], self.chosen[-len(self.routers):],
                            token_mask.reshape(n), coef)


def balance_loss(logits: list[torch.Tensor], chosen: list[torch.Tensor], token_mask: torch.Tensor,
                 coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's load-balance loss and the per-expert load, averaged over layers.

    Per layer, over the T tokens with `token_mask` [N] nonzero (N = all routed rows):
        P_i = mean_t softmax(logits_t)_i                  mean gate probability of expert i
        f_i = E · (assignments to i) / (T · k)            E × expert i's share of the T·k assignments
        L   = coef · Σ_i P_i f_i                          = coef when routing is uniform
    Returns (mean over layers of L, mean over layers of the shares f_i / E [E], summing to 1).

    transformers' `load_balancing_loss_func` differs in two ways: its f_i is the count over T (k
    times the share, so its value is k × ours), and it pools every layer's counts and
    probabilities before taking the product, where this takes the product per layer.
    """
    m = token_mask.float()
    tokens = m.sum().clamp(min=1)
    losses, loads = [], []
    for layer_logits, layer_chosen in zip(logits, chosen):
        num_experts, k = layer_logits.shape[-1], layer_chosen.shape[-1]
        probs = torch.softmax(layer_logits.float(), dim=-1)  # [N, E]
        p_mean = (probs * m[:, None]).sum(0) / tokens  # P_i [E]
        counts = F.one_hot(layer_chosen, num_experts).float().sum(1)  # [N, E]: 1 where i is chosen
        share = (counts * m[:, None]).sum(0).detach() / (tokens * k)  # [E], sums to 1
        losses.append((p_mean * num_experts * share).sum())
        loads.append(share)
    return coef * torch.stack(losses).mean(), torch.stack(loads).mean(0)


def expert_stats(balance: torch.Tensor, load: torch.Tensor) -> dict[str, torch.Tensor]:
    """What the learners log of a mixture's routing: the balance loss and each expert's load."""
    return {"balance_loss": balance.detach(), **{f"expert_load_{i}": share for i, share in enumerate(load)}}


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(total, active per token) parameters: a token runs k of the E routed experts of each layer
    (the embedding counts once even when the LM head shares it)."""
    total = sum(p.numel() for p in model.parameters())
    idle = 0
    for block in getattr(model, "module", model).modules() if Qwen2MoeSparseMoeBlock is not None else ():
        if isinstance(block, Qwen2MoeSparseMoeBlock):
            experts = block.experts
            per_expert = (experts.gate_up_proj.numel() + experts.down_proj.numel()) // experts.num_experts
            idle += (experts.num_experts - block.gate.top_k) * per_expert
    return total, total - idle


def checkpoint_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with Qwen2-MoE's stacked expert tensors under the per-expert names of the
    saved checkpoint (what `save_pretrained` writes and vLLM's loader reads):

        ...mlp.experts.gate_up_proj [E, 2F, C] -> ...mlp.experts.{e}.gate_proj.weight, .up_proj.weight [F, C]
        ...mlp.experts.down_proj    [E, C, F]  -> ...mlp.experts.{e}.down_proj.weight [C, F]

    Every other entry is passed through, so a dense model's dict comes back unchanged."""
    out = {}
    for name, t in state_dict.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name.removesuffix("gate_up_proj")
            gate, up = t.chunk(2, dim=1)  # [E, F, C] each
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.gate_proj.weight"] = gate[e]
                out[f"{prefix}{e}.up_proj.weight"] = up[e]
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name.removesuffix("down_proj")
            for e, down in enumerate(t.unbind(0)):
                out[f"{prefix}{e}.down_proj.weight"] = down
        else:
            out[name] = t
    return out
