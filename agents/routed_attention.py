"""The `routed_attention` backbone: BiFormer's bi-level routing attention, made 1-D and causal.

A Llama whose attention reads, for each query, only its own region of the sequence and the k past
regions whose keys it likes best (docs/backbones.md has the equations and what differs from the
paper). With regions of R tokens by position id (region ρ holds positions ρR .. ρR + R - 1):

    k̄_ρ        = mean of the (post-RoPE, detached) keys of region ρ       per KV head
    a_p(ρ)     = Σ_{h in the KV head's group} q_{h,p} · k̄_ρ              for completed past ρ < ⌊p/R⌋
    S_p        = top-k of a_p over those regions (all of them when there are ≤ k)
    attn_p     = softmax over keys j ≤ p with ⌊j/R⌋ = ⌊p/R⌋ or ⌊j/R⌋ ∈ S_p   (otherwise Llama's)
    o_p        = attn_p · V + LePE_p,   LePE_p = Σ_{i<K} w_i ⊙ v_{p-i} + b   (causal depthwise conv)

k̄ · q is the mean attention logit of the query over the region, so the router picks the regions
the query would attend to most on average. Routing is per query (the paper routes per region,
which would read the future queries of the query's own region) and per KV head (shared by its
query heads: what a gather kernel wants, one K/V gather per KV head). The selection has no
gradient (it is a top-k of indices), as in the paper.

The forward here builds a boolean mask [n, H, t, T] from the selection and runs SDPA with it: at
these sizes a gather kernel would not pay; `keys_per_query` counts what it would save. The
engine's cached forward (rollout/decoders/routed_attention.py) calls the same `plan_routing`,
`route` and `local_conv` below, on the keys and values of its cache.

Everything positional goes by position ids and the key mask, never by tensor column: the engine
left-pads rows and leaves gaps of padding between a session's cached tokens and its new ones.
Shapes: n rows, t new tokens (queries), T keys (cached + new columns), H query heads, KV key/value
heads (G = H / KV per group), D head dim, Nr regions, K the LePE kernel.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForTokenClassification,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
)
from transformers.modeling_layers import GenericForTokenClassification
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from agents.broadcast import add_uniform, uniform_weights

if TYPE_CHECKING:
    from agents.model import ModelConfig

MODEL_TYPE = "turnstile_routed_attention"


class RoutedAttentionConfig(LlamaConfig):
    """A Llama config plus the three routing keys (saved in config.json, so from_pretrained restores
    them). transformers 5 configs are dataclasses: the annotated fields below are the new ones."""

    model_type = MODEL_TYPE
    region_size: int = 16  # R, tokens per region
    top_regions: int = 4  # k, completed past regions each query attends to besides its own
    local_conv: int = 3  # K, kernel of the causal LePE conv on the values; 0 = none
    context_broadcast: bool = False  # uniform attention over all past real keys added to each head


def build(cfg: ModelConfig, vocab_size: int, pad_id: int, bos_id: int, eos_id: int) -> RoutedAttentionForCausalLM:
    """A freshly initialised routed-attention policy for a `model.arch: routed_attention` section (float32)."""
    hf_cfg = RoutedAttentionConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size or 4 * cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
        max_position_embeddings=cfg.max_seq_len,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_embeddings,
        region_size=cfg.region_size,
        top_regions=cfg.top_regions,
        local_conv=cfg.local_conv,
        context_broadcast=cfg.context_broadcast,
        pad_token_id=pad_id,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        attn_implementation="sdpa",
    )
    return RoutedAttentionForCausalLM(hf_cfg)


# -- the routing, shared with the engine's decoder ---------------------------------------------------


@dataclass
class RoutingPlan:
    """What routing needs of one forward that is the same in every layer: where each key sits."""

    key_valid: torch.Tensor  # [n, T] bool: a real token (not padding)
    key_region: torch.Tensor  # [n, T] long: ⌊position / R⌋; padding -> num_regions (a spare slot)
    num_regions: int  # Nr: regions 0 .. Nr - 1 cover every real position of the call
    counts: torch.Tensor  # [n, Nr] float: real keys per region
    eligible: torch.Tensor  # [n, t, Nr] bool: completed past regions (ρ < the query's) that hold keys
    own_region: torch.Tensor  # [n, t, T] bool: key in the query's own region
    causal: torch.Tensor  # [n, t, T] bool: a real key at a position ≤ the query's
    own_column: torch.Tensor  # [t, T] bool: the query's own column (a pad query must see something)
    prev_cols: torch.Tensor | None  # [n, t, K] long: columns of the query's token and the K-1 real ones before it
    prev_ok: torch.Tensor | None  # [n, t, K] bool: that token exists (and the query is real)


def plan_routing(key_valid: torch.Tensor, query_pos: torch.Tensor, region_size: int, local_conv: int) -> RoutingPlan:
    """The plan for queries at positions `query_pos` [n, t] (the last t of the T columns) over keys
    `key_valid` [n, T]. The new columns' positions are the queries'; a row's cached real columns
    are the tokens before its first new real one, at consecutive positions (what a KV cache holds:
    the engine's sessions and transformers' caches alike), so their positions come from their
    rank among the row's real columns."""
    n, T = key_valid.shape
    t = query_pos.shape[1]
    dev = key_valid.device
    rank = key_valid.long().cumsum(-1) - 1  # [n, T]: index of each real column among the row's real ones
    new_valid = key_valid[:, T - t :]  # [n, t]
    n_cached = key_valid[:, : T - t].sum(-1)  # [n]
    big = torch.iinfo(torch.long).max
    first_new = torch.where(new_valid, query_pos, big).min(-1).values  # [n]
    offset = torch.where(first_new == big, 0, first_new - n_cached)  # position of rank 0
    key_pos = torch.cat([rank[:, : T - t] + offset[:, None], query_pos], dim=1)  # [n, T]

    R = region_size
    last = torch.maximum(query_pos.max(), key_pos.masked_fill(~key_valid, 0).max())
    num_regions = int(last) // R + 1  # one host sync per forward, not per layer
    key_region = torch.where(key_valid, key_pos // R, num_regions)  # [n, T]
    query_region = query_pos // R  # [n, t]
    counts = torch.zeros(n, num_regions + 1, device=dev).scatter_add_(1, key_region, key_valid.float())
    counts = counts[:, :num_regions]  # [n, Nr]
    regions = torch.arange(num_regions, device=dev)
    eligible = (regions < query_region[..., None]) & (counts[:, None, :] > 0)  # [n, t, Nr]
    own_region = key_region[:, None, :] == query_region[..., None]  # [n, t, T] (padding: never, its slot is Nr)
    causal = key_valid[:, None, :] & (key_pos[:, None, :] <= query_pos[..., None])  # [n, t, T]
    cols = torch.arange(T, device=dev)
    own_column = cols[None, :] == (T - t + torch.arange(t, device=dev))[:, None]  # [t, T]

    prev_cols = prev_ok = None
    if local_conv:
        # column of each rank (padding columns all go to the spare slot T, then dropped)
        col_of_rank = torch.zeros(n, T + 1, dtype=torch.long, device=dev)
        col_of_rank.scatter_(1, torch.where(key_valid, rank, T), cols.expand(n, T))
        back = rank[:, T - t :, None] - torch.arange(local_conv, device=dev)  # [n, t, K]: tap i, i tokens back
        prev_ok = (back >= 0) & new_valid[..., None]
        prev_cols = col_of_rank.gather(1, back.clamp(min=0).flatten(1)).view(n, t, local_conv)
    return RoutingPlan(key_valid, key_region, num_regions, counts, eligible, own_region, causal, own_column,
                       prev_cols, prev_ok)


def route(q: torch.Tensor, k: torch.Tensor, plan: RoutingPlan, top_regions: int) -> torch.Tensor:
    """Which keys each query keeps [n, KV, t, T] (bool): its own region, and the top-k completed past
    regions by Σ_{h in group} q_h · k̄_ρ. q [n, H, t, D] and k [n, KV, T, D] post-RoPE. In fp32 and
    detached: the selection is a top-k of indices (no gradient), and fp32 keeps near-ties rare
    between a bf16 engine and an fp32 learner."""
    n, H, t, D = q.shape
    KV, T = k.shape[1], k.shape[2]
    Nr = plan.num_regions
    idx = plan.key_region[:, None, :, None].expand(n, KV, T, D)
    k_sum = torch.zeros(n, KV, Nr + 1, D, device=k.device).scatter_add_(2, idx, k.detach().float())
    k_bar = k_sum[:, :, :Nr] / plan.counts[:, None, :, None].clamp(min=1)  # [n, KV, Nr, D] region keys
    scores = torch.einsum("nkgtd,nkrd->nktr", q.detach().float().view(n, KV, H // KV, t, D), k_bar)  # [n, KV, t, Nr]
    scores = scores.masked_fill(~plan.eligible[:, None], float("-inf"))
    # top-k with ties going to the most recent regions, the same in every batch shape (topk's own
    # order among ties is not: a zero query, e.g. the zero embedding of the pad id, ties them all)
    order = scores.flip(-1).sort(dim=-1, descending=True, stable=True).indices[..., :top_regions]
    chosen = Nr - 1 - order  # [n, KV, t, k]
    best = scores.gather(-1, chosen)
    chosen = chosen.masked_fill(best == float("-inf"), Nr)  # fewer eligible regions than k: the spare slot
    picked = torch.zeros(n, KV, t, Nr + 1, dtype=torch.bool, device=k.device).scatter_(-1, chosen, True)
    picked[..., Nr] = False  # the spare slot (padding keys, unfilled picks) is never kept
    keep = picked.gather(-1, plan.key_region[:, None, None, :].expand(n, KV, t, T))  # [n, KV, t, T]
    return keep | plan.own_region[:, None]


def local_conv(v: torch.Tensor, plan: RoutingPlan, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """LePE: the causal depthwise conv over each row's real tokens' values, at the t queries.
    v [n, KV, T, D] (cached + new columns); weight [KV D, 1, K] (nn.Conv1d's, channel kv D + d);
    returns [n, KV, t, D]. Tokens before the row's first are zeros (a left-padded conv)."""
    n, KV, T, D = v.shape
    t, K = plan.prev_cols.shape[1:]
    taps = v.gather(2, plan.prev_cols.view(n, 1, t * K, 1).expand(n, KV, t * K, D)).view(n, KV, t, K, D)
    taps = torch.where(plan.prev_ok[:, None, :, :, None], taps, 0)
    w = weight.view(KV, D, K).flip(-1).to(v.dtype)  # conv index K-1-i multiplies the token i steps back
    out = torch.einsum("nktid,kdi->nktd", taps, w)
    return out if bias is None else out + bias.view(KV, 1, D).to(v.dtype)


def broadcast_keys(plan: RoutingPlan) -> torch.Tensor:
    """The keys `model.context_broadcast` averages, [n, 1, t, T] bool: every real key at a position
    ≤ the query's, routed or not (the query's own column always: a pad query's row is not empty).
    The broadcast is the global summary the routing leaves out, and it does not jump when the
    router's choice flips."""
    return (plan.causal | plan.own_column)[:, None]


def keys_per_query(length: int, region_size: int, top_regions: int) -> tuple[float, float]:
    """(dense, routed) mean keys a query attends to over positions 0 .. length-1: dense p + 1;
    routed (p mod R) + 1 in its region plus R per selected past region. What the attention's
    score and value matmuls cost per query, in units of 2 H D multiply-adds each."""
    R, k = region_size, top_regions
    dense = routed = 0
    for p in range(length):
        dense += p + 1
        routed += p % R + 1 + R * min(k, p // R)
    return dense / length, routed / length


# -- the model ---------------------------------------------------------------------------------------


class CausalLocalConv(nn.Conv1d):
    """LePE's depthwise conv over the values (its weights are nn.Conv1d's, so transformers
    initialises them like one), applied causally over each row's real tokens by `local_conv`."""

    def __init__(self, channels: int, kernel: int):
        super().__init__(channels, channels, kernel, groups=channels)

    def forward(self, v: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        return local_conv(v, plan, self.weight, self.bias)


class RoutedAttention(LlamaAttention):
    """Llama's attention (same projections, RoPE and cache), reading only the keys `route` keeps,
    plus LePE. transformers' attention backends are bypassed: this is SDPA with its own mask."""

    def __init__(self, config: RoutedAttentionConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.top_regions = config.top_regions
        kv_channels = config.num_key_value_heads * self.head_dim
        self.lepe = CausalLocalConv(kv_channels, config.local_conv) if config.local_conv else None

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None,
                routing_plan: RoutingPlan | None = None, **kwargs):
        if routing_plan is None:
            raise ValueError("RoutedAttention needs the routing_plan its RoutedAttentionModel makes")
        n, t, _ = hidden_states.shape
        H, D = self.config.num_attention_heads, self.head_dim
        KV = self.config.num_key_value_heads
        q = self.q_proj(hidden_states).view(n, t, H, D).transpose(1, 2)  # [n, H, t, D]
        k = self.k_proj(hidden_states).view(n, t, KV, D).transpose(1, 2)  # [n, KV, t, D]
        v = self.v_proj(hidden_states).view(n, t, KV, D).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)  # [n, KV, T, D]
        T = k.shape[2]
        plan = routing_plan
        keep = route(q, k, plan, self.top_regions)  # [n, KV, t, T]
        allowed = (keep & plan.causal[:, None]) | plan.own_column  # a pad query keeps its own column
        allowed = allowed[:, :, None].expand(n, KV, H // KV, t, T).reshape(n, H, t, T)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=self.scaling,
                                           dropout_p=self.attention_dropout if self.training else 0.0,
                                           enable_gqa=H != KV)  # [n, H, t, D]
        if self.lepe is not None:  # each KV head's LePE goes to its G query heads
            o = o + self.lepe(v, plan).repeat_interleave(H // KV, dim=1)
        if self.config.context_broadcast:  # the mean of the values of all past real keys, routed or not
            o = add_uniform(o, uniform_weights(broadcast_keys(plan), v.dtype), v)
        o = o.transpose(1, 2).reshape(n, t, H * D)
        return self.o_proj(o), None


class RoutedAttentionDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config: RoutedAttentionConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.self_attn = RoutedAttention(config, layer_idx)


class RoutedAttentionPreTrainedModel(LlamaPreTrainedModel):
    config: RoutedAttentionConfig
    config_class = RoutedAttentionConfig
    _no_split_modules = ["RoutedAttentionDecoderLayer"]
    _supports_flash_attn = False  # the attention is SDPA with the routing mask, whatever the config says
    _supports_flex_attn = False


class RoutedAttentionModel(RoutedAttentionPreTrainedModel, LlamaModel):
    """LlamaModel with routed attention layers; its forward makes the routing plan once for all layers."""

    def __init__(self, config: RoutedAttentionConfig):
        RoutedAttentionPreTrainedModel.__init__(self, config)
        self.padding_idx, self.vocab_size = config.pad_token_id, config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([RoutedAttentionDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, **kwargs):
        """LlamaModel's forward; attention_mask: None or [n, cached + new] (1 = a real token)."""
        n, t = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        device = (input_ids if input_ids is not None else inputs_embeds).device
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:  # LlamaModel's default: consecutive from the cache's length
            position_ids = (torch.arange(t, device=device) + past).expand(n, t)
        if attention_mask is None:
            key_valid = torch.ones(n, past + t, dtype=torch.bool, device=device)
        elif attention_mask.dim() == 2:
            key_valid = attention_mask.bool()
        else:
            raise ValueError(f"model.arch=routed_attention takes a 2-D attention_mask [batch, keys], not "
                             f"{tuple(attention_mask.shape)}: it builds its own from the routing")
        plan = plan_routing(key_valid, position_ids.expand(n, t), self.config.region_size, self.config.local_conv)
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                               routing_plan=plan, **kwargs)


class RoutedAttentionForCausalLM(RoutedAttentionPreTrainedModel, LlamaForCausalLM):
    def __init__(self, config: RoutedAttentionConfig):
        RoutedAttentionPreTrainedModel.__init__(self, config)
        self.model = RoutedAttentionModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


class RoutedAttentionForTokenClassification(GenericForTokenClassification, RoutedAttentionPreTrainedModel):
    """The PPO critic's class (algos/learner.py: build_critic): `.model` is a RoutedAttentionModel."""


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(total, active per token): every parameter runs for every token (routing prunes keys, not weights)."""
    total = sum(p.numel() for p in model.parameters())
    return total, total


AutoConfig.register(MODEL_TYPE, RoutedAttentionConfig, exist_ok=True)
AutoModel.register(RoutedAttentionConfig, RoutedAttentionModel, exist_ok=True)
AutoModelForCausalLM.register(RoutedAttentionConfig, RoutedAttentionForCausalLM, exist_ok=True)
AutoModelForTokenClassification.register(RoutedAttentionConfig, RoutedAttentionForTokenClassification, exist_ok=True)
