"""The `factor` backbone: a dense Llama whose every SwiGLU FFN is cut into E experts (FactorLLM).

A trained dense FFN  FFN(h) = W_down (silu(W_gate h) ⊙ W_up h)  with F hidden neurons is split
by contiguous neuron slices: expert j keeps neurons [j·s, (j+1)·s), s = F / E, i.e. rows of
W_gate and W_up and columns of W_down. Since W_down is linear in the neurons,

    FFN(h) = Σ_{j=1..E} E_j(h),   E_j(h) = W_down[:, j] (silu(W_gate[j] h) ⊙ W_up[j] h)      exactly.

A router Linear(C, E) per layer then picks k experts per token (docs/backbones.md):

    p = softmax(W_r h)                                              router probabilities [E]
    y = Σ_{i ∈ top-k(p)} w_i · E_i(h),   w_i = E · p_i / Σ_{j ∈ top-k(p)} p_j

w is the renormalised top-k softmax times k, times the paper's E/k output rescale: with uniform
weights over the chosen experts (p_i equal) w_i = E/k, the paper's `(E/k) · Σ_{top-k} E_i(h)`;
unlike a hard rescale, the weights carry the LM loss's gradient into the router during SFT and RL.

The router learns from the Prior-Approximate (PA) loss: per token,
    ℓ_j  = MSE(E_j(h), FFN(h) / (E/k))                   how well slice j alone stands in
    m    = top-k mask of −ℓ                              the teacher: the k best slices (0/1) [E]
    L_PA = KL(softmax(W_r h) ‖ softmax(m))
plus L_bal = mean(top-k-mask(p) ⊙ p) (the router's own top-k); added as 0.05 L_PA + 0.01 L_bal
(averaged over layers) to whatever loss trains the model: `auxiliary_loss`, which
`agents.model.auxiliary_losses` collects for SFT and the RL learner. algos/convert.py trains only
the routers this way on a converted model (attention, norms, embeddings and experts frozen).

The model keeps the dense FFN's weight matrices as they are (gate_proj / up_proj / down_proj of
shape [F, C], [F, C], [C, F]: expert j is a slice of them), so a Llama state dict loads into it
as is and only `mlp.router.weight` is new. The learner's forward runs every neuron and zeroes the
unchosen slices (exact, and one matmul each); the engine's decoder (rollout/decoders/factor.py)
runs only the chosen slices: that is where the k/E of the FFN's FLOPs is saved.

Shapes in comments: N tokens, C hidden, F FFN width, E experts, s = F/E neurons per expert.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForTokenClassification,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForTokenClassification,
    LlamaModel,
)

from agents.broadcast import BroadcastLlamaAttention

if TYPE_CHECKING:
    from agents.model import ModelConfig

MODEL_TYPE = "turnstile_factor"
PA_COEF = 0.05  # FactorLLM's weight of the Prior-Approximate routing loss
BALANCE_COEF = 0.01  # ... and of its balance term


class FactorSplitError(ValueError):
    """A dense model that cannot be split into experts; the message says what and why."""


@strict
class FactorConfig(LlamaConfig):
    """A Llama config plus the factorisation: saved in config.json, so `from_pretrained` restores it."""

    model_type = MODEL_TYPE

    num_experts: int = 8  # E: slices per FFN
    num_experts_per_tok: int = 4  # k: slices each token runs
    router_pa_coef: float = PA_COEF
    router_balance_coef: float = BALANCE_COEF
    context_broadcast: bool = False  # uniform attention added to each head (agents/broadcast.py)

    def validate_architecture(self):
        super().validate_architecture()
        if self.intermediate_size % self.num_experts:
            raise ValueError(f"intermediate_size={self.intermediate_size} is not divisible by "
                             f"num_experts={self.num_experts}: experts are equal slices of the FFN's neurons")
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} exceeds num_experts={self.num_experts}")


# -- the losses (pure functions, so tests can check them by hand) ----------------------------------


def expert_outputs(act: torch.Tensor, down: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Every expert's output E_j(h) [N, E, C] from the FFN's activations act = silu(gate h) ⊙ up h
    [N, F] and W_down [C, F]: expert j's slice of neurons through its columns of W_down."""
    n, f = act.shape
    s = f // num_experts
    a = act.view(n, num_experts, s).transpose(0, 1)  # [E, N, s]
    w = down.view(down.shape[0], num_experts, s).permute(1, 2, 0)  # [E, s, C]
    return torch.bmm(a, w).transpose(0, 1)  # [N, E, C]


def pa_teacher(experts: torch.Tensor, top_k: int) -> torch.Tensor:
    """The PA teacher mask m [N, E] (1 on the k slices whose output is nearest FFN(h) / (E/k)) from
    the experts' outputs [N, E, C] (their sum is FFN(h))."""
    num_experts = experts.shape[1]
    target = experts.sum(1, keepdim=True) * (top_k / num_experts)  # FFN(h) / (E/k) [N, 1, C]
    err = (experts - target).pow(2).mean(-1)  # ℓ_j [N, E]
    chosen = (-err).topk(top_k, dim=-1).indices
    return torch.zeros_like(err).scatter_(1, chosen, 1.0)


def pa_loss(logits: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per token KL(softmax(logits) ‖ softmax(m)) = Σ_j p_j (log p_j − log softmax(m)_j) [N]."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return (logp.exp() * (logp - F.log_softmax(teacher.float(), dim=-1))).sum(-1)


def balance_term(probs: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Per token mean_j(top-k-mask(p)_j · p_j) = (Σ_{i ∈ top-k} p_i) / E [N]: FactorLLM's balance term."""
    return probs.gather(-1, chosen).sum(-1) / probs.shape[-1]


def route(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(p [N, E] fp32, weights w [N, k], chosen [N, k]) of router logits [N, E]: top-k of p, and
    w_i = E · p_i / Σ_{top-k} p (the E/k rescale when the chosen p are equal). The engine's decoder
    calls this too, so both route alike."""
    probs = torch.softmax(logits.float(), dim=-1)
    top, chosen = probs.topk(top_k, dim=-1)
    return probs, top * (probs.shape[-1] / top.sum(-1, keepdim=True)), chosen


# -- the model -------------------------------------------------------------------------------------


class FactorMoE(nn.Module):
    """A SwiGLU FFN cut into E slice-experts, with a router; replaces LlamaMLP in each layer."""

    def __init__(self, config: FactorConfig):
        super().__init__()
        C, Fw = config.hidden_size, config.intermediate_size
        self.num_experts, self.top_k = config.num_experts, config.num_experts_per_tok
        self.pa_coef, self.balance_coef = config.router_pa_coef, config.router_balance_coef
        self.num_layers = config.num_hidden_layers  # the aux losses are averaged over layers
        # The dense FFN's matrices as they are: expert j = rows [j s, (j+1) s) of gate/up, columns of down.
        self.gate_proj = nn.Linear(C, Fw, bias=False)
        self.up_proj = nn.Linear(C, Fw, bias=False)
        self.down_proj = nn.Linear(Fw, C, bias=False)
        self.router = nn.Linear(C, self.num_experts, bias=False)
        self._record = None  # (router logits [N, E], chosen [N, k], teacher [N, E]) of the last recorded forward
        self.record = False  # record in eval / no-grad forwards too (`recording`: measuring the PA loss)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        shape, C, E = h.shape, h.shape[-1], self.num_experts
        x = h.reshape(-1, C)  # [N, C]
        logits = self.router(x)  # [N, E]
        probs, weights, chosen = route(logits, self.top_k)  # [N, E], [N, k], [N, k]
        gates = torch.zeros_like(probs).scatter(1, chosen, weights).to(x.dtype)  # w_i on the top-k, else 0 [N, E]
        act = F.silu(self.gate_proj(x)) * self.up_proj(x)  # every neuron [N, F]
        n = act.shape[0]
        # Σ_i w_i E_i(h) = W_down (act with slice i scaled by w_i): one matmul, unchosen slices zeroed
        y = self.down_proj((act.view(n, E, -1) * gates[:, :, None]).view(n, -1))  # [N, C]
        if self.record or (self.training and torch.is_grad_enabled()):
            with torch.no_grad():  # the teacher: which slices best stand in for the whole FFN
                teacher = pa_teacher(expert_outputs(act, self.down_proj.weight, E), self.top_k)
            self._record = (logits, chosen, teacher)
        else:
            self._record = None  # never leave a stale record for auxiliary_loss
        return y.view(shape)

    def auxiliary_loss(self, token_mask: torch.Tensor) -> tuple[torch.Tensor, dict] | None:
        """(this layer's share of 0.05 L_PA + 0.01 L_bal, stats) over the tokens where `token_mask`
        [batch, length] is nonzero, from the last training forward (None after an eval or no-grad one,
        unless under `recording`).
        Each layer adds 1/L of its mean, so the sum over layers is the mean over layers."""
        if self._record is None:
            return None
        logits, chosen, teacher = self._record
        self._record = None  # read once: frees the graph it holds
        m = token_mask.reshape(-1).to(logits.device, torch.float32)  # [N]
        tokens = m.sum().clamp(min=1)
        probs = torch.softmax(logits.float(), dim=-1)
        pa = (pa_loss(logits, teacher) * m).sum() / tokens
        bal = (balance_term(probs, chosen) * m).sum() / tokens
        per_layer = 1.0 / self.num_layers
        picked = torch.zeros_like(probs).scatter_(1, chosen, 1.0)  # [N, E]
        with torch.no_grad():
            load = (picked * m[:, None]).sum(0) / (tokens * self.top_k)  # share of assignments [E]
            overlap = ((picked * teacher).sum(-1) / self.top_k * m).sum() / tokens  # router ∩ teacher
        stats = {"pa_loss": (self.pa_coef * pa * per_layer).detach(),
                 "router_balance_loss": (self.balance_coef * bal * per_layer).detach(),
                 "router_teacher_overlap": overlap * per_layer,
                 **{f"expert_load_{i}": share * per_layer for i, share in enumerate(load)}}
        return (self.pa_coef * pa + self.balance_coef * bal) * per_layer, stats


class FactorModel(LlamaModel):
    """LlamaModel with a FactorMoE in place of every layer's MLP."""

    config_class = FactorConfig

    def __init__(self, config: FactorConfig):
        super().__init__(config)
        for i, layer in enumerate(self.layers):
            layer.mlp = FactorMoE(config)
            if config.context_broadcast:
                layer.self_attn = BroadcastLlamaAttention(config, i)
        self.post_init()  # initialises the new modules (the routers' normal(0, 0.02))


class FactorForCausalLM(LlamaForCausalLM):
    config_class = FactorConfig

    def __init__(self, config: FactorConfig):
        super().__init__(config)
        self.model = FactorModel(config)
        self.post_init()


class FactorForTokenClassification(LlamaForTokenClassification):
    """PPO's critic (algos/learner.py: build_critic): its `.model` is AutoModel's, a FactorModel."""

    config_class = FactorConfig


AutoConfig.register(MODEL_TYPE, FactorConfig)
AutoModel.register(FactorConfig, FactorModel)
AutoModelForCausalLM.register(FactorConfig, FactorForCausalLM)
AutoModelForTokenClassification.register(FactorConfig, FactorForTokenClassification)


def moe_blocks(model: nn.Module) -> list[FactorMoE]:
    """The model's FactorMoE blocks in layer order (empty for other models; a DeepSpeed engine works)."""
    return [m for m in getattr(model, "module", model).modules() if isinstance(m, FactorMoE)]


def routers(model: nn.Module) -> list[nn.Linear]:
    return [block.router for block in moe_blocks(model)]


@contextmanager
def recording(model: nn.Module):
    """Within: every forward of `model` keeps what `auxiliary_loss` reads, in eval mode and
    under no_grad too (to measure the PA loss without training)."""
    blocks = moe_blocks(model)
    for block in blocks:
        block.record = True
    try:
        yield model
    finally:
        for block in blocks:
            block.record = False


# -- building and converting -----------------------------------------------------------------------


def build(cfg: ModelConfig, vocab_size: int, pad_id: int, bos_id: int, eos_id: int) -> FactorForCausalLM:
    """A freshly initialised factor policy for a `model.arch: factor` section (float32). Usually a
    factor model comes from `split_dense` of a trained dense one instead (launch.py convert)."""
    hf_cfg = FactorConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size or 4 * cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
        max_position_embeddings=cfg.max_seq_len,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_embeddings,
        num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k,
        context_broadcast=cfg.context_broadcast,
        pad_token_id=pad_id,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        attn_implementation="sdpa",
    )
    return FactorForCausalLM(hf_cfg)


def split_dense(dense: nn.Module, num_experts: int, top_k: int) -> FactorForCausalLM:
    """The factor model of a dense LlamaForCausalLM: the same weights (each FFN now E slices whose
    sum is the dense FFN), plus a freshly initialised router per layer; same dtype and device."""
    cfg = dense.config
    if getattr(cfg, "model_type", None) not in ("llama", "turnstile_llama"):  # the latter: context_broadcast
        raise FactorSplitError(f"split_dense needs a dense Llama, got model_type={getattr(cfg, 'model_type', None)}")
    if cfg.intermediate_size % num_experts:
        raise FactorSplitError(f"the dense FFN's intermediate_size={cfg.intermediate_size} is not divisible by "
                               f"num_experts={num_experts}: experts are equal slices of its neurons")
    if top_k > num_experts:
        raise FactorSplitError(f"top_k={top_k} exceeds num_experts={num_experts}")
    if cfg.mlp_bias or cfg.hidden_act != "silu":
        raise FactorSplitError(f"split_dense splits bias-free SwiGLU FFNs (mlp_bias={cfg.mlp_bias}, "
                               f"hidden_act={cfg.hidden_act})")
    fields = {k: v for k, v in cfg.to_dict().items()
              if k not in ("model_type", "architectures", "transformers_version", "dtype", "torch_dtype")}
    fcfg = FactorConfig(**fields, num_experts=num_experts, num_experts_per_tok=top_k)
    fcfg._attn_implementation = cfg._attn_implementation
    p = next(dense.parameters())
    model = FactorForCausalLM(fcfg).to(p.device, p.dtype)
    missing, unexpected = model.load_state_dict(dense.state_dict(), strict=False)
    if unexpected or any(not k.endswith("mlp.router.weight") for k in missing):
        raise FactorSplitError(f"the dense weights do not fit the factor model: missing {missing}, "
                               f"unexpected {unexpected}")
    return model.train(dense.training)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(total, active per token) parameters: a token runs k of the E slices of each FFN (the
    embedding counts once even when the LM head shares it)."""
    total = sum(p.numel() for p in model.parameters())
    idle = sum((b.num_experts - b.top_k) * 3 * b.down_proj.weight.numel() // b.num_experts for b in moe_blocks(model))
    return total, total - idle


def ffn_flops_per_token(config) -> dict[str, int]:
    """FLOPs (2 per multiply-add) per token and layer: the dense FFN, the factor layer (k of E
    slices + the router), and their ratio."""
    C, Fw = config.hidden_size, config.intermediate_size
    E, k = config.num_experts, config.num_experts_per_tok
    dense = 2 * 3 * C * Fw
    factor = 2 * 3 * C * (Fw // E) * k + 2 * C * E
    return {"dense_ffn": dense, "factor_ffn": factor, "router": 2 * C * E, "ratio": factor / dense}
