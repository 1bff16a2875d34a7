"""The `monarch` backbone: a Llama whose MLP (and optionally attention) linears are Monarch
matrices (Dao et al., "Monarch: Expressive Structured Matrices for Efficient and Accurate
Training"), docs/backbones.md has the equations, the counts and what differs from the paper.

A Monarch matrix M [m, n] with b blocks is a product of two block-diagonal matrices and two fixed
permutations, M = P_out · L · P · R:

    n = b·p inputs, m = b·s outputs, r = max(1, ⌈min(n, m) / b²⌉) the rank of each block, q = b·r
    R   block-diagonal, b blocks [q, p]     block k reads inputs k·p .. k·p+p-1
    P   block k's q outputs are b slices of r; slice j goes to block j of L
    L   block-diagonal, b blocks [s, q]     block j reads slice j of every R block (k-major)
    P_out  output i = s_idx·b + j           (block j's s outputs are strided by b)

Written out, block (j, k) of M viewed as [s, b, b, p] is a rank-r product of the two factors,

    M[s_idx·b + j, k·p + p_idx] = Σ_{t<r} L[j, s_idx, k·r + t] · R[k, j·r + t, p_idx]

so the Monarch matrices are exactly the matrices whose b² such blocks have rank ≤ r, and the
nearest one (Frobenius) to a dense W is a rank-r truncated SVD of each block (`project`): exact
when W is Monarch. r = 1 (b² = min(n, m), e.g. b = √n for a square one) is the paper's
definition; b = 4 on a small layer gives r > 1, the generalisation the paper's GPT-2 runs used
(fly's MonarchLinear). Parameters b·r·(n + m) instead of n·m; FLOPs per token twice that.

Here: `MonarchLinear` (a drop-in for nn.Linear), `project` / `MonarchLinear.from_dense` (dense ->
Monarch), the transformers classes (`MonarchConfig`, model_type "turnstile_monarch", registered
with the Auto classes on import), `build`, `project_dense_model` (a trained dense Llama policy ->
a monarch one) and `monarch_report` (parameters and FLOPs per layer).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForTokenClassification,
    LlamaConfig,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GenericForTokenClassification
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

from agents.broadcast import BroadcastLlamaAttention, ContextBroadcastAttention

if TYPE_CHECKING:
    from agents.model import ModelConfig

MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


# -- the Monarch linear ---------------------------------------------------------------------------


def monarch_rank(in_features: int, out_features: int, nblocks: int) -> int:
    """r, the rank of each of the b² blocks: the middle width b·r covers min(n, m), so a Monarch
    layer can be full rank (r = 1 when b² ≥ min(n, m): the paper's square Monarch at b = √n)."""
    return max(1, math.ceil(min(in_features, out_features) / nblocks**2))


def monarch_multiply(x: torch.Tensor, R: torch.Tensor, L: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """y = M x for `groups` Monarch matrices of one shape that read the same input, with their
    factors stacked: R [b, G q, p] (each block's G·q outputs, group-major), L [G b, s, q].
    x [..., n] -> y [..., G m], each group's m outputs in turn. Two batched matmuls over blocks
    (the engine runs q/k/v or gate/up as one group); G = 1 is a `MonarchLinear`."""
    b, gq, p = R.shape
    G, s, q = groups, L.shape[1], gq // groups
    r = q // b
    lead, N = x.shape[:-1], x[..., 0].numel()
    xb = x.reshape(N, b, p).transpose(0, 1)  # [b(k), N, p]: block k's inputs
    u = torch.bmm(xb, R.transpose(1, 2))  # [b(k), N, G q], q = (j r)
    # P: slice j (r wide) of every R block k goes to L block j, k-major
    u = u.view(b, N, G, b, r).permute(2, 3, 1, 0, 4).reshape(G * b, N, b * r)  # [(G j), N, (k r)]
    y = torch.bmm(u, L.transpose(1, 2))  # [(G j), N, s]
    # P_out: output s_idx·b + j
    return y.view(G, b, N, s).permute(2, 0, 3, 1).reshape(*lead, G * s * b)  # [..., (G s j)]


class MonarchLinear(nn.Module):
    """y = M x + bias with M = P_out · L · P · R (module docstring): a drop-in for
    nn.Linear(in_features, out_features, bias), both sizes divisible by `nblocks`."""

    def __init__(self, in_features: int, out_features: int, nblocks: int = 4, bias: bool = False,
                 rank: int | None = None):
        super().__init__()
        for name, size in (("in_features", in_features), ("out_features", out_features)):
            if size % nblocks:
                raise ValueError(f"MonarchLinear: nblocks={nblocks} does not divide {name}={size}")
        self.in_features, self.out_features, self.nblocks = in_features, out_features, nblocks
        self.rank = rank or monarch_rank(in_features, out_features, nblocks)
        self.in_block, self.out_block = in_features // nblocks, out_features // nblocks  # p, s
        q = nblocks * self.rank
        self.R = nn.Parameter(torch.empty(nblocks, q, self.in_block))  # [b, q, p]
        self.L = nn.Parameter(torch.empty(nblocks, self.out_block, q))  # [b, s, q]
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.reset_parameters()

    def reset_parameters(self, std: float | None = None) -> None:
        """The dense-equivalent M gets i.i.d.-like entries of variance std² (nn.Linear's default
        scale 1/(3n) when None; Llama's initializer_range through the model's init): R keeps the
        input's scale (std 1/√p) and L carries the rest (each entry of M sums r products)."""
        std = std if std is not None else (3 * self.in_features) ** -0.5
        nn.init.normal_(self.R, std=self.in_block**-0.5)
        nn.init.normal_(self.L, std=std * (self.in_block / self.rank) ** 0.5)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = monarch_multiply(x, self.R, self.L)
        return y if self.bias is None else y + self.bias

    def dense(self) -> torch.Tensor:
        """The equivalent dense matrix [out, in] (written from the block formula, not the forward)."""
        b, p, s, r = self.nblocks, self.in_block, self.out_block, self.rank
        L = self.L.view(b, s, b, r)  # [j, s, k, t]
        R = self.R.view(b, b, r, p)  # [k, j, t, p]
        return torch.einsum("jskt,kjtp->sjkp", L, R).reshape(self.out_features, self.in_features)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, nblocks: int, bias: torch.Tensor | None = None) -> MonarchLinear:
        """The Monarch layer nearest (Frobenius) to nn.Linear weights `weight` [out, in], `bias` [out]."""
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, nblocks, bias=bias is not None)
        layer.copy_dense_(weight, bias)
        return layer.to(weight.dtype)

    @torch.no_grad()
    def copy_dense_(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Set the factors to the projection of `weight` [out, in] (and copy `bias`), in place."""
        R, L = project(weight, self.nblocks, self.rank)
        self.R.copy_(R)
        self.L.copy_(L)
        if self.bias is not None:
            self.bias.copy_(bias if bias is not None else torch.zeros_like(self.bias))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, nblocks={self.nblocks}, "
                f"rank={self.rank}, bias={self.bias is not None}")


def project(weight: torch.Tensor, nblocks: int, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors (R [b, q, p], L [b, s, q]) of the Monarch matrix nearest to `weight` [m, n] in
    Frobenius norm: the blocks W[s_idx·b + j, k·p + p_idx] are disjoint, so the nearest matrix
    whose blocks have rank ≤ r is each block's rank-r truncated SVD (Eckart-Young), split
    √σ to either side. Exact (to rounding) when `weight` is Monarch. SVD in float64."""
    m, n = weight.shape
    b = nblocks
    r = rank or monarch_rank(n, m, b)
    s, p = m // b, n // b
    blocks = weight.detach().double().reshape(s, b, b, p).permute(1, 2, 0, 3)  # [j, k, s, p]
    U, S, Vh = torch.linalg.svd(blocks, full_matrices=False)  # [j, k, s, c], [j, k, c], [j, k, c, p]
    root = S[..., :r].sqrt()
    left = U[..., :r] * root[..., None, :]  # [j, k, s, t]
    right = Vh[..., :r, :] * root[..., None]  # [j, k, t, p]
    L = left.permute(0, 2, 1, 3).reshape(b, s, b * r)  # [j, s, (k t)]
    R = right.permute(1, 0, 2, 3).reshape(b, b * r, p)  # [k, (j t), p]
    return R.to(weight.dtype), L.to(weight.dtype)


# -- the transformers model ------------------------------------------------------------------------


class MonarchConfig(LlamaConfig):
    """A Llama config and the two Monarch fields (saved in config.json, restored by from_pretrained)."""

    model_type = "turnstile_monarch"

    monarch_blocks: int = 4  # b of every Monarch linear
    monarch_attention: bool = False  # q/k/v/o Monarch too (else only the MLP's gate/up/down)
    context_broadcast: bool = False  # uniform attention added to each head (agents/broadcast.py)


class MonarchMLP(nn.Module):
    """Llama's SwiGLU MLP, down(silu(gate(h)) · up(h)), with Monarch gate/up/down."""

    def __init__(self, config: MonarchConfig):
        super().__init__()
        C, F, b, bias = config.hidden_size, config.intermediate_size, config.monarch_blocks, config.mlp_bias
        self.gate_proj = MonarchLinear(C, F, b, bias)
        self.up_proj = MonarchLinear(C, F, b, bias)
        self.down_proj = MonarchLinear(F, C, b, bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class MonarchAttention(LlamaAttention):
    """Llama's attention with Monarch q/k/v/o (same shapes, biases as the config says)."""

    def __init__(self, config: MonarchConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        for name in ATTENTION_PROJECTIONS:
            dense = getattr(self, name)
            setattr(self, name, MonarchLinear(dense.in_features, dense.out_features, config.monarch_blocks,
                                              dense.bias is not None))


class BroadcastMonarchAttention(ContextBroadcastAttention, MonarchAttention):
    """MonarchAttention plus uniform attention (model.context_broadcast)."""


class MonarchDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config: MonarchConfig, layer_idx: int):
        # skip LlamaDecoderLayer.__init__ (it would build a dense MLP only to drop it); same fields
        super(LlamaDecoderLayer, self).__init__()
        self.hidden_size = config.hidden_size
        attention = {(False, False): LlamaAttention, (True, False): MonarchAttention,
                     (False, True): BroadcastLlamaAttention, (True, True): BroadcastMonarchAttention}[
            (bool(config.monarch_attention), bool(config.context_broadcast))]
        self.self_attn = attention(config=config, layer_idx=layer_idx)
        self.mlp = MonarchMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class MonarchPreTrainedModel(LlamaPreTrainedModel):
    config_class = MonarchConfig
    config: MonarchConfig
    _no_split_modules = ["MonarchDecoderLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, MonarchLinear):  # M's entries at the dense Llama's scale (reset_parameters)
            init.normal_(module.R, std=module.in_block**-0.5)
            init.normal_(module.L, std=self.config.initializer_range * (module.in_block / module.rank) ** 0.5)
            if module.bias is not None:
                init.zeros_(module.bias)
        else:
            super()._init_weights(module)


class MonarchModel(MonarchPreTrainedModel, LlamaModel):
    def __init__(self, config: MonarchConfig):
        # LlamaModel's fields with Monarch layers (its __init__ would build and init dense ones first)
        super(LlamaModel, self).__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([MonarchDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class MonarchForCausalLM(MonarchPreTrainedModel, LlamaForCausalLM):
    def __init__(self, config: MonarchConfig):
        super(LlamaForCausalLM, self).__init__(config)
        self.model = MonarchModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


class MonarchForTokenClassification(GenericForTokenClassification, MonarchPreTrainedModel):
    """The PPO critic's class (algos/learner.py: build_critic): a MonarchModel and a `score` head."""


AutoConfig.register(MonarchConfig.model_type, MonarchConfig, exist_ok=True)
AutoModel.register(MonarchConfig, MonarchModel, exist_ok=True)
AutoModelForCausalLM.register(MonarchConfig, MonarchForCausalLM, exist_ok=True)
AutoModelForTokenClassification.register(MonarchConfig, MonarchForTokenClassification, exist_ok=True)


def build(cfg: ModelConfig, vocab_size: int, pad_id: int, bos_id: int, eos_id: int) -> MonarchForCausalLM:
    """A freshly initialised monarch policy for a `model.arch: monarch` section (float32)."""
    hf_cfg = MonarchConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size or 4 * cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
        max_position_embeddings=cfg.max_seq_len,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_embeddings,
        monarch_blocks=cfg.monarch_blocks,
        monarch_attention=cfg.monarch_attention,
        context_broadcast=cfg.context_broadcast,
        pad_token_id=pad_id,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        attn_implementation="sdpa",
    )
    return MonarchForCausalLM(hf_cfg)


@torch.no_grad()
def project_dense_model(model: PreTrainedModel, nblocks: int = 4, attention: bool = False) -> MonarchForCausalLM:
    """A monarch policy from a (trained) dense Llama one: every MLP linear (and q/k/v/o when
    `attention`) replaced by its nearest Monarch matrix (`project`), every other weight copied.
    Same dtype and device as `model`; its log-probs are the dense model's where the projected
    weights were Monarch already, and approximate them otherwise (fine-tune after)."""
    if getattr(model.config, "model_type", None) not in ("llama", "turnstile_llama"):  # keeps context_broadcast
        raise ValueError(f"project_dense_model takes a dense Llama policy, not model_type="
                         f"{getattr(model.config, 'model_type', None)}")
    fields = {k: v for k, v in model.config.to_dict().items()
              if k not in ("model_type", "architectures", "transformers_version", "dtype", "torch_dtype")}
    cfg = MonarchConfig(**fields, monarch_blocks=nblocks, monarch_attention=attention)
    cfg._attn_implementation = model.config._attn_implementation
    p = next(model.parameters())
    monarch = MonarchForCausalLM(cfg).to(p.device)
    state = dict(model.state_dict())
    for name, module in monarch.named_modules():
        if isinstance(module, MonarchLinear):
            module.copy_dense_(state.pop(f"{name}.weight"), state.pop(f"{name}.bias", None))
    missing, unexpected = monarch.load_state_dict(state, strict=False)
    left = [k for k in missing if not k.endswith((".R", ".L"))]
    if left or unexpected:
        raise ValueError(f"project_dense_model: weights that do not map: missing {left}, unexpected {unexpected}")
    return monarch.to(p.dtype).train(model.training)


# -- parameters and FLOPs --------------------------------------------------------------------------


def monarch_report(model: nn.Module) -> list[dict]:
    """Per decoder layer and projection: its shape, blocks and rank, parameters and matmul FLOPs
    per token (2 per multiply-add; bias adds not counted), and those of the dense nn.Linear of the
    same shape. Dense projections of a monarch model (attention when monarch_attention is off)
    report their own counts. Attention's score and value FLOPs (which grow with the context) and
    the embedding and LM head are the dense policy's and are not rows here."""
    rows = []
    inner = getattr(model, "module", model).model
    for i, layer in enumerate(inner.layers):
        for part, names in (("self_attn", ATTENTION_PROJECTIONS), ("mlp", MLP_PROJECTIONS)):
            for name in names:
                lin = getattr(getattr(layer, part), name)
                n, m = lin.in_features, lin.out_features
                bias = lin.bias.numel() if lin.bias is not None else 0
                monarch = isinstance(lin, MonarchLinear)
                macs = lin.R.numel() + lin.L.numel() if monarch else n * m
                rows.append({
                    "layer": i, "name": f"{part}.{name}", "kind": "monarch" if monarch else "dense",
                    "in": n, "out": m, "blocks": lin.nblocks if monarch else None,
                    "rank": lin.rank if monarch else None,
                    "params": macs + bias, "dense_params": n * m + bias,
                    "flops": 2 * macs, "dense_flops": 2 * n * m,
                })
    return rows


def format_report(rows: list[dict]) -> str:
    """`monarch_report`'s rows as a text table, with per-layer and whole-model totals."""
    head = f"{'layer':>5} {'projection':<16} {'kind':<8} {'in':>5} {'out':>5} {'b':>3} {'r':>3} " \
           f"{'params':>9} {'dense':>9} {'FLOPs/tok':>10} {'dense':>10} {'ratio':>6}"
    lines = [head]

    def line(layer, name, kind, n, m, b, r, params, dense_params, flops, dense_flops):
        return (f"{layer:>5} {name:<16} {kind:<8} {n:>5} {m:>5} {b if b else '':>3} {r if r else '':>3} "
                f"{params:>9,} {dense_params:>9,} {flops:>10,} {dense_flops:>10,} {flops / dense_flops:>6.3f}")

    for x in rows:
        lines.append(line(x["layer"], x["name"], x["kind"], x["in"], x["out"], x["blocks"], x["rank"],
                          x["params"], x["dense_params"], x["flops"], x["dense_flops"]))
    keys = ("params", "dense_params", "flops", "dense_flops")
    for label, pick in (("mlp", "mlp."), ("attention", "self_attn."), ("all", "")):
        chosen = [x for x in rows if x["name"].startswith(pick)]
        sums = [sum(x[k] for x in chosen) for k in keys]
        lines.append(line("all", f"{label} total", "", "", "", None, None, *sums))
    return "\n".join(lines)
