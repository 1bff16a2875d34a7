"""OneS (Xue et al., "One Student Knows All Experts Know", 2022): a trained `moe` policy
(agents/moe.py, Qwen2-MoE) turned into a plain dense Llama student by gathering each layer's
experts into one SwiGLU FFN. algos/distill.py then distils the student against the mixture.

The student keeps the teacher's embeddings, attention (with its q/k/v biases: the Llama config
has `attention_bias=True`, whose extra o_proj bias is set to 0), RMSNorms and LM head as they are;
only the FFN changes. Per layer, with h the FFN input (after its RMSNorm), SwiGLU experts
E(h) = D (silu(G h) ⊙ U h), and the teacher's

    y(h) = Σ_i g_i(h) · E_i(h) + s(h) · E_s(h),   g_i(h) = p_i(h) · [i ∈ top-k(p(h))],  s(h) = σ(w_s · h)

the gates g and s are per token and the student has no gate, so each method replaces them by
constants measured on calibration tokens t (the teacher's own FFN inputs on the recipe's demos):

    ḡ_i = mean_t g_i(h_t)      mean routed weight of expert i
    s̄   = mean_t s(h_t)        mean shared gate
    f_i = share of the top-k assignments that go to expert i (its load)

(with no calibration tokens: a uniform router's values, ḡ_i = w · k / E with w = 1/E, or 1/k
when the router renormalises its top-k, and s̄ = σ(0) = ½). A SwiGLU FFN whose neurons are the
concatenation of several FFNs' neurons (gate and up rows stacked, down columns stacked) computes
the sum of their outputs, which is how the student holds more than one expert. The methods
(width W = the student's FFN width; F_s shared, F routed expert width, E experts; R = W − F_s):

    sum      y' = s̄ E_s + Σ_i ḡ_i E_i                      every neuron kept: W = F_s + E·F
    average  y' = s̄ E_s + Σ_j (Σ_{i∈S_j} ḡ_i) Ē_j           Ē_j: elementwise mean of the weights of
             the experts in group S_j; the E experts split in index order into m = R/F groups
             (m = 1: the paper's averaging of all experts; m = E: the same as sum)
    topk     y' = s̄ E_s + ρ Σ_{i∈K} ḡ_i E_i                 K: the m = R/F experts of highest load f
             (measured, or given), ρ = Σ_i ḡ_i / Σ_{i∈K} ḡ_i keeps the mean routed mass
    svd      y' = D' [a_s(h); a_S(h)]                       the shared expert's neurons plus the R
             routed neurons S of highest rank-R leverage in Z = [g_{e(n)}(h_t) a_n(h_t) ‖d_n‖]_{t,n}
             (each routed neuron's real, gated contribution; SVD Z = U Σ Vᵀ, leverage ℓ_n = Σ_{r<R}
             V_{n r}²), and the down projection refitted by ridge least squares to the teacher's
             output: D' = argmin_X ‖A Xᵀ − Y‖² + λ‖X − X₀‖², A [T, W] the kept neurons' ungated
             activations, Y [T, C] the teacher's y(h_t), X₀ the sum method's down columns
             (s̄ d, ḡ d) for those neurons, λ = ridge · tr(AᵀA) / W

Exactness: sum is exact (to float rounding) when every gate is the same constant on every token,
i.e. g_i(h) ≡ ḡ_i and s(h) ≡ s̄: a router whose top-k takes all experts (k = E) with equal logits
(W_g = 0: g_i = 1/E), or a single routed expert (E = k = 1: g = 1, any router), together with a
shared gate w_s = 0 (s = ½). Otherwise every method is an approximation that distillation
refines: a gate that varies with the token cannot be a constant, and an elementwise average of
experts whose neurons are not aligned is not their average output. average and topk with m = E
equal sum. The paper describes its four methods on expert weight matrices (it publishes no code);
these are their forms for SwiGLU experts plus a gated shared expert, as docs/backbones.md says.

Defaults: W = 4 · hidden (the dense policy's width, so the student runs at dense speed), which the
moe defaults make F_s + k·F (the teacher's active width); sum's W is fixed by the teacher.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

GATHERS = ("sum", "average", "topk", "svd")


class GatherError(ValueError):
    """A teacher, method or width that gathering cannot use; the message says which and why."""


@dataclass
class GateStats:
    """One layer's gates, averaged over the calibration tokens (see the module docstring)."""

    routed: torch.Tensor  # ḡ [E]: mean routed weight of each expert
    shared: float  # s̄: mean shared gate
    load: torch.Tensor  # f [E]: share of the top-k assignments, sums to 1


def check_teacher(model: PreTrainedModel) -> None:
    """Raise GatherError unless `model` is a Qwen2-MoE whose every layer is a mixture (what
    `model.arch: moe` builds)."""
    cfg = model.config
    kind = getattr(cfg, "model_type", type(model).__name__)
    if kind != "qwen2_moe":
        raise GatherError(f"the teacher is a {kind} model, not a model.arch=moe one (qwen2_moe): OneS gathers "
                          "a mixture's experts")
    if cfg.decoder_sparse_step != 1 or cfg.mlp_only_layers or cfg.hidden_act != "silu":
        raise GatherError("the teacher has dense layers or a non-SwiGLU MLP (decoder_sparse_step="
                          f"{cfg.decoder_sparse_step}, mlp_only_layers={cfg.mlp_only_layers}, hidden_act="
                          f"{cfg.hidden_act}); model.arch=moe makes every layer a SwiGLU mixture")


def _blocks(model: PreTrainedModel) -> list:
    return [layer.mlp for layer in model.model.layers]


@torch.no_grad()
def gates(block, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A Qwen2-MoE block's per-token gates on h [T, C]: (g [T, E] routed weights, 0 for experts
    not in the token's top-k; s [T] shared gate), in float32 like the router."""
    logits = F.linear(h, block.gate.weight)  # [T, E]
    probs = torch.softmax(logits.float(), dim=-1)
    weights, chosen = probs.topk(block.gate.top_k, dim=-1)  # [T, k]
    if block.gate.norm_topk_prob:
        weights = weights / weights.sum(-1, keepdim=True)
    g = torch.zeros_like(probs).scatter(-1, chosen, weights)
    s = torch.sigmoid(F.linear(h, block.shared_expert_gate.weight).float())[:, 0]
    return g, s


@torch.no_grad()
def gate_stats(block, h: torch.Tensor | None = None) -> GateStats:
    """ḡ, s̄ and f of one block over the tokens h [T, C]; h None = a uniform router's values."""
    num_experts, k = block.gate.num_experts, block.gate.top_k
    if h is None:
        w = 1 / k if block.gate.norm_topk_prob else 1 / num_experts
        uniform = torch.full((num_experts,), 1 / num_experts, device=block.gate.weight.device)
        return GateStats(uniform * w * k, 0.5, uniform)
    g, s = gates(block, h)
    counts = (g > 0).float().sum(0)  # [E] assignments
    return GateStats(g.mean(0), float(s.mean()), counts / counts.sum())


@torch.no_grad()
def calibration_inputs(teacher: PreTrainedModel, batches, max_tokens: int | None = None) -> list[torch.Tensor]:
    """Each layer's FFN input h on the real tokens of `batches` (dicts with input_ids and
    attention_mask [B, L]): per layer [T, C] float32, at most `max_tokens` tokens."""
    captured: list[list[torch.Tensor]] = [[] for _ in teacher.model.layers]
    mask_now: list[torch.Tensor] = []

    def hook(layer: int):
        def fn(module, args):
            h = args[0]  # [B, L, C]
            captured[layer].append(h[mask_now[0]].float())  # [real tokens, C]
        return fn

    handles = [block.register_forward_pre_hook(hook(i)) for i, block in enumerate(_blocks(teacher))]
    try:
        seen = 0
        for batch in batches:
            mask_now[:] = [batch["attention_mask"].bool()]
            teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            seen += int(mask_now[0].sum())
            if max_tokens is not None and seen >= max_tokens:
                break
    finally:
        for handle in handles:
            handle.remove()
    if not captured[0]:
        raise GatherError("no calibration tokens: the batches were empty")
    return [torch.cat(c)[:max_tokens] for c in captured]


def _expert(block, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Routed expert i's (gate [F, C], up [F, C], down [C, F])."""
    gate, up = block.experts.gate_up_proj[i].chunk(2, dim=0)
    return gate, up, block.experts.down_proj[i]


def _shared(block) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mlp = block.shared_expert
    return mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight


def _concat(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], coefs: list[float | torch.Tensor]):
    """One SwiGLU FFN whose neurons are the parts' neurons, each part's output scaled by its
    coefficient: (gate [ΣF, C], up [ΣF, C], down [C, ΣF])."""
    return (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
            torch.cat([c * p[2] for p, c in zip(parts, coefs)], dim=1))


def _swiglu_act(h: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(F.linear(h, gate)) * F.linear(h, up)  # [T, F]


def _routed_groups(method: str, block, stats: GateStats, m: int):
    """The routed parts and their coefficients for average (m groups) and topk (m experts)."""
    num_experts = block.gate.num_experts
    if method == "average":
        parts, coefs = [], []
        for group in torch.arange(num_experts).tensor_split(m):
            experts = [_expert(block, int(i)) for i in group]
            parts.append(tuple(torch.stack(ws).mean(0) for ws in zip(*experts)))  # elementwise mean
            coefs.append(stats.routed[group].sum())
        return parts, coefs
    kept = stats.load.topk(m).indices.sort().values  # [m], in index order
    rho = stats.routed.sum() / stats.routed[kept].sum().clamp(min=1e-12)
    return [_expert(block, int(i)) for i in kept], [rho * stats.routed[i] for i in kept]


def _svd_layer(block, stats: GateStats, h: torch.Tensor, r: int, ridge: float):
    """svd gathering of one block on its calibration inputs h [T, C] to F_s + r neurons."""
    g, s = gates(block, h)  # [T, E], [T]
    num_experts = g.shape[1]
    experts = [_expert(block, i) for i in range(num_experts)]
    gate_all = torch.cat([e[0] for e in experts])  # [E F, C]
    up_all = torch.cat([e[1] for e in experts])
    down_all = torch.cat([e[2] for e in experts], dim=1)  # [C, E F]
    width = experts[0][0].shape[0]
    act = _swiglu_act(h, gate_all, up_all)  # [T, E F] ungated
    g_neuron = g.repeat_interleave(width, dim=1)  # [T, E F]: each neuron's expert's gate
    z = act * g_neuron * down_all.norm(dim=0)  # gated contributions, scaled to output size
    _, _, vh = torch.linalg.svd(z.double(), full_matrices=False)  # vh [min(T, E F), E F]
    leverage = (vh[:r] ** 2).sum(0)  # [E F]
    chosen = leverage.topk(r).indices.sort().values  # [r], neuron order kept
    s_gate, s_up, s_down = _shared(block)
    gate = torch.cat([s_gate, gate_all[chosen]])  # [W, C]
    up = torch.cat([s_up, up_all[chosen]])
    # the fit: the kept neurons' ungated activations to the teacher's whole FFN output
    a = torch.cat([_swiglu_act(h, s_gate, s_up), act[:, chosen]], dim=1).double()  # [T, W]
    y = (F.linear(act * g_neuron, down_all) + s[:, None] * F.linear(_swiglu_act(h, s_gate, s_up), s_down)).double()
    prior = torch.cat([stats.shared * s_down, down_all[:, chosen] * stats.routed.repeat_interleave(width)[chosen]],
                      dim=1).double()  # X₀ [C, W]
    gram = a.T @ a  # [W, W]
    lam = ridge * gram.diagonal().mean().clamp(min=1e-12)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    down = torch.linalg.solve(gram + lam * eye, a.T @ y + lam * prior.T).T  # [C, W]
    return gate, up, down.to(s_down.dtype)


def student_config(teacher_cfg, width: int) -> LlamaConfig:
    """The dense Llama config of a student of `teacher_cfg` (Qwen2MoeConfig) with FFN width `width`."""
    return LlamaConfig(
        vocab_size=teacher_cfg.vocab_size,
        hidden_size=teacher_cfg.hidden_size,
        intermediate_size=width,
        num_hidden_layers=teacher_cfg.num_hidden_layers,
        num_attention_heads=teacher_cfg.num_attention_heads,
        num_key_value_heads=teacher_cfg.num_key_value_heads,
        head_dim=teacher_cfg.hidden_size // teacher_cfg.num_attention_heads,
        max_position_embeddings=teacher_cfg.max_position_embeddings,
        rope_parameters=dict(teacher_cfg.rope_parameters),
        rms_norm_eps=teacher_cfg.rms_norm_eps,
        tie_word_embeddings=teacher_cfg.tie_word_embeddings,
        attention_bias=teacher_cfg.qkv_bias,  # Llama's flag also gives o_proj a bias: set to 0 below
        mlp_bias=False,
        pad_token_id=teacher_cfg.pad_token_id,
        bos_token_id=teacher_cfg.bos_token_id,
        eos_token_id=teacher_cfg.eos_token_id,
        attn_implementation="sdpa",
    )


def gathered_width(teacher: PreTrainedModel, method: str, width: int | None = None) -> int:
    """The student's FFN width for `method` (checked): sum's is fixed by the teacher."""
    if method not in GATHERS:
        raise GatherError(f"gather={method!r} is not one of {', '.join(GATHERS)}")
    cfg = teacher.config
    shared, expert, num_experts = cfg.shared_expert_intermediate_size, cfg.moe_intermediate_size, cfg.num_experts
    full = shared + num_experts * expert
    if method == "sum":
        if width is not None and width != full:
            raise GatherError(f"sum keeps every neuron: its width is shared {shared} + {num_experts} experts × "
                              f"{expert} = {full}, not {width}")
        return full
    width = width if width is not None else 4 * cfg.hidden_size
    routed = width - shared
    if method == "svd":
        if not 0 < routed <= num_experts * expert:
            raise GatherError(f"svd width {width} must exceed the shared expert's {shared} by 1 to "
                              f"{num_experts * expert} routed neurons (at most {full} in all)")
        return width
    if routed % expert or not 1 <= routed // expert <= num_experts:
        raise GatherError(f"{method} width {width} must be the shared expert's {shared} plus m × the expert width "
                          f"{expert} with 1 ≤ m ≤ {num_experts}, e.g. {shared + expert}")
    return width


@torch.no_grad()
def gather_dense(teacher: PreTrainedModel, method: str, width: int | None = None,
                 inputs: list[torch.Tensor] | None = None, load: torch.Tensor | None = None,
                 ridge: float = 1e-3) -> LlamaForCausalLM:
    """The dense Llama student of `teacher` (a `model.arch: moe` Qwen2-MoE) gathered by `method`
    (sum, average, topk or svd; the module docstring has the equations), float32, in eval mode.

    inputs: each layer's calibration FFN inputs [T, C] (`calibration_inputs`), from which the
    gate means and loads are measured (None: a uniform router's; svd needs them). load: the
    experts' loads [E] or per layer [L, E], which topk then keeps by instead of measuring them.
    """
    check_teacher(teacher)
    width = gathered_width(teacher, method, width)
    if method == "svd" and inputs is None:
        raise GatherError("svd gathering fits each layer on calibration tokens: pass inputs (calibration_inputs)")
    if method == "topk" and inputs is None and load is None:
        raise GatherError("topk keeps the most used experts: pass calibration inputs or the experts' load")
    # the gathering and its fits in float32 (a bf16 teacher is copied, not cast in place)
    teacher_f32 = teacher if next(teacher.parameters()).dtype == torch.float32 else copy.deepcopy(teacher).float()
    cfg = teacher_f32.config
    device = next(teacher_f32.parameters()).device
    expert = cfg.moe_intermediate_size
    student = LlamaForCausalLM(student_config(cfg, width)).to(device)

    state = {k: v for k, v in teacher_f32.state_dict().items() if ".mlp." not in k}
    for i, block in enumerate(_blocks(teacher_f32)):
        h = inputs[i].to(device) if inputs is not None else None
        stats = gate_stats(block, h)
        if load is not None:
            stats.load = (load[i] if load.dim() == 2 else load).float().to(device)
        if method == "svd":
            gate, up, down = _svd_layer(block, stats, h, width - cfg.shared_expert_intermediate_size, ridge)
        else:
            if method == "sum":
                routed = [_expert(block, e) for e in range(cfg.num_experts)]
                coefs = list(stats.routed)
            else:
                routed, coefs = _routed_groups(method, block, stats, (width - cfg.shared_expert_intermediate_size)
                                               // expert)
            gate, up, down = _concat([_shared(block), *routed], [stats.shared, *coefs])
        prefix = f"model.layers.{i}."
        state[prefix + "mlp.gate_proj.weight"] = gate
        state[prefix + "mlp.up_proj.weight"] = up
        state[prefix + "mlp.down_proj.weight"] = down
        if cfg.qkv_bias:  # Qwen2-MoE's o_proj has no bias
            state[prefix + "self_attn.o_proj.bias"] = torch.zeros(cfg.hidden_size, device=device)
    student.load_state_dict(state, strict=True)  # every student tensor set (a tied LM head: the embedding)
    return student.eval()
