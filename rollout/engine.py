"""The embedded torch inference engine: batched decoding over a KV cache.

One interface for every backend (this one, vLLM): `generate` takes token-id prompts and returns
new token ids with their sampling log-probs; `update_weights` loads a new policy state dict;
`release` forgets stored conversations.

Why it is fast on small policies: the prompt is run once (prefill, in groups of similar length so
padding wastes little), then each step feeds one token per live sequence against a preallocated
cache; sequences that stop are compacted out of the batch (and out of the cache), so finished
rows stop costing compute. Llama-architecture models run through a lean forward of the same math
with half the tensor ops. With `sessions`, a multi-turn episode keeps its KV between turns and
each turn prefills only its new tokens. docs/rollout.md has the details and measurements.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicLayer


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be ≥ 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be ≥ 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Completion:
    token_ids: list[int] = field(default_factory=list)
    # log-prob of each sampled token under the sampling distribution (logits / temperature, before
    # top-p truncation; plain log-softmax when greedy) — what an importance ratio needs.
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str = "length"  # "stop" (a stop token, included in token_ids) or "length"
    # constrained decoding: per token, the token ids that were allowed at its step (None = free);
    # the learner needs them to compute the same masked distribution.
    allowed: list[list[int] | None] | None = None


class _GrowingLayer(DynamicLayer):
    """A KV-cache layer in preallocated buffers that double when full.

    transformers' DynamicLayer concatenates on every step, copying the whole cache each token
    (quadratic in length); here a token costs one slice write, and the buffers grow rarely (never,
    when the cache is told its final length up front).
    """

    def __init__(self, capacity: int = 0):
        super().__init__()
        self._capacity = capacity
        self._k = self._v = None
        self._len = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._k = self._v = None
        self._len = 0

    def preload(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        """Adopt buffers [batch, kv heads, capacity, head dim] whose first `length` columns are filled."""
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self._k, self._v, self._len = keys, values, length
        self.keys, self.values = keys[:, :, :length], values[:, :, :length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, h, t, d = key_states.shape  # [batch, kv heads, new tokens, head dim]
        need = self._len + t
        if self._k is None or need > self._k.shape[2]:
            cap = max(need, 2 * (self._k.shape[2] if self._k is not None else 0), 64, self._capacity)
            k, v = key_states.new_empty(b, h, cap, d), value_states.new_empty(b, h, cap, d)
            if self._len:
                k[:, :, : self._len] = self._k[:, :, : self._len]
                v[:, :, : self._len] = self._v[:, :, : self._len]
            self._k, self._v = k, v
        self._k[:, :, self._len : need] = key_states
        self._v[:, :, self._len : need] = value_states
        self._len = need
        self.keys, self.values = self._k[:, :, :need], self._v[:, :, :need]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized and self._k is not None:
            self._k, self._v = self._k[indices], self._v[indices]
            self.keys, self.values = self._k[:, :, : self._len], self._v[:, :, : self._len]


class GrowingCache(Cache):
    """A KV cache of `_GrowingLayer`s, one per decoder layer; `capacity` presizes the buffers."""

    def __init__(self, num_layers: int, capacity: int = 0):
        super().__init__(layers=[_GrowingLayer(capacity) for _ in range(num_layers)])


def check_request(prompts: Sequence[Sequence[int]], sessions: Sequence[Hashable] | None) -> None:
    """What every backend's generate requires of its arguments."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (a BOS token at least)")
    if sessions is not None:
        if len(sessions) != len(prompts):
            raise ValueError(f"got {len(sessions)} sessions for {len(prompts)} prompts")
        if len(set(sessions)) != len(sessions):
            raise ValueError("session keys must be distinct within one generate call")


class InferenceEngine(Protocol):
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        sessions: Sequence[Hashable] | None = None,
        choices: Sequence[Sequence[Sequence[int]] | None] | None = None,
    ) -> list[Completion]: ...

    def update_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None: ...

    def release(self, sessions: Iterable[Hashable]) -> None: ...


def sample_tokens(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] -> (tokens [B], logprobs [B])."""
    logits = logits.float()
    if temperature == 0:
        logp = torch.log_softmax(logits, dim=-1)
        tokens = logits.argmax(dim=-1)
        return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)
    logp = torch.log_softmax(logits / temperature, dim=-1)  # [B, V]
    probs = logp.exp()
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    # argmax(p / E) with E ~ Exp(1) i.i.d. draws token i with probability p_i (an exponential race);
    # on CPU it is several times faster than torch.multinomial, whose exponential_ is slow.
    race = torch.rand(probs.shape, generator=generator, device=probs.device, dtype=probs.dtype).log_().neg_()
    tokens = probs.div_(race).argmax(dim=-1)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


class _RowsView:
    """Rows of a `_GrowingLayer`'s buffers (a view) that take new KV from column `start` on."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, start: int):
        self.keys, self.values, self.start = keys, values, start

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor):
        end = self.start + key_states.shape[2]
        self.keys[:, :, self.start : end] = key_states
        self.values[:, :, self.start : end] = value_states
        return self.keys[:, :, :end], self.values[:, :, :end]


def choice_tree(choices: Sequence[Sequence[int]]) -> dict:
    """Token-id sequences as a prefix tree {token: subtree}; a finished sequence is {}."""
    root: dict = {}
    for seq in choices:
        node = root
        for token in seq:
            node = node.setdefault(token, {})
    return root


def allowed_next(node: dict | None, fallback: Sequence[int]) -> list[int] | None:
    """The tokens a row standing at `node` of its choice tree may write next; None = any. A row
    past the end of every choice may only stop (`fallback` tokens; none given: it runs free)."""
    if node is None:
        return None
    return list(node) or list(fallback) or None


def mask_logits(logits: torch.Tensor, allowed: Sequence[Sequence[int] | None]) -> torch.Tensor:
    """logits [N, V] (fp32) with every token outside row n's `allowed[n]` at the float minimum
    (None = the row is free). A finite minimum rather than -inf: the masked tokens get exactly 0
    probability, and p·log p stays 0 (an entropy over -inf logits is NaN)."""
    rows, cols, masked = [], [], []
    for n, ids in enumerate(allowed):
        if ids is not None:
            masked.append(n)
            rows += [n] * len(ids)
            cols += list(ids)
    logits = logits.float()
    if not masked:
        return logits
    keep = torch.ones(logits.shape, dtype=torch.bool, device=logits.device)
    keep[masked] = False
    keep[rows, cols] = True
    return logits.masked_fill(~keep, torch.finfo(torch.float32).min)


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask as an additive bias: 0 where allowed, -inf elsewhere."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def _length_groups(lengths: Sequence[int], cost_per_group: int) -> list[tuple[int, int]]:
    """Split a batch into contiguous groups [a, b) minimising the padded size (group size x its
    longest) + `cost_per_group` per group (the fixed cost of one more call)."""
    n = len(lengths)
    best, cut = [0] * (n + 1), [0] * (n + 1)
    for j in range(1, n + 1):
        longest, best[j], cut[j] = 0, None, 0
        for i in range(j - 1, -1, -1):
            longest = max(longest, lengths[i])
            c = best[i] + (j - i) * longest + cost_per_group
            if best[j] is None or c < best[j]:
                best[j], cut[j] = c, i
    groups, j = [], n
    while j:
        groups.append((cut[j], j))
        j = cut[j]
    return groups[::-1]


def _onednn_linear_works(dtype: torch.dtype) -> bool:
    """Whether oneDNN's prepacked linear ops run here (CPU builds with mkldnn) and agree with F.linear."""
    if dtype not in (torch.float32, torch.bfloat16) or not torch.backends.mkldnn.is_available():
        return False
    try:
        lp = torch.ops.mkldnn._linear_pointwise
        g = torch.Generator().manual_seed(0)  # leave the global RNG alone
        x, w, other = (torch.randn(shape, generator=g).to(dtype) for shape in ((3, 2, 16), (8, 16), (3, 2, 8)))
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 32)
        ref = F.linear(x, w)
        tol = 1e-4 if dtype == torch.float32 else 0.1
        return (
            torch.allclose(lp(x, packed, None, "none", [], ""), ref, atol=tol, rtol=tol)
            and torch.allclose(lp(x, packed, None, "swish", [], ""), F.silu(ref), atol=tol, rtol=tol)
            and torch.allclose(lp.binary(x, other, packed, None, "add"), ref + other, atol=tol, rtol=tol)
            and torch.allclose(lp.binary(x, other, packed, None, "mul"), ref * other, atol=tol, rtol=tol)
        )
    except Exception:
        return False


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """Attention for one query per row, written as plain reductions for torch.compile to fuse.

    q [n, H, 1, D]; k, v [n, KV, T, D] (H a multiple of KV: grouped-query heads share k/v);
    bias [n, 1, 1, T] additive (0 / -inf). Returns [n, H, 1, D]. Inductor turns this into one
    loop over (row, head) that streams K and V once, accumulating in fp32; torch's CPU SDPA reached
    ~6 GFLOPS on these shapes (and was slower still in bf16), see docs/rollout.md."""
    n, H, _, D = q.shape
    KV, dtype = k.shape[1], v.dtype
    q = q.reshape(n, KV, H // KV, 1, D).float()  # [n, KV, G, 1, D]
    s = (q * k[:, :, None].float()).sum(-1) * scale + bias.float()  # [n, KV, G, T]
    p = torch.softmax(s, dim=-1)
    o = (p[..., None] * v[:, :, None].float()).sum(-2)  # [n, KV, G, D]
    return o.reshape(n, H, 1, D).to(dtype)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """torch's attention with `_decode_attention`'s signature: q [n, H, t, D], k/v [n, KV, T, D]."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


_COMPILED_ATTENTION: dict[torch.dtype, object] = {}  # dtype -> compiled function, or None if it failed


def _compiled_decode_attention(dtype: torch.dtype):
    """`_decode_attention` compiled by inductor for CPU, or None where compiling fails (no C++
    compiler, an unsupported build) or disagrees with SDPA. Probed once per process and dtype."""
    if dtype not in _COMPILED_ATTENTION:
        fn = None
        try:
            compiled = torch.compile(_decode_attention, dynamic=True, fullgraph=True)
            g = torch.Generator().manual_seed(0)  # leave the global RNG alone
            q = torch.randn(3, 4, 1, 32, generator=g).to(dtype)
            k, v = (torch.randn(3, 2, 7, 32, generator=g).to(dtype) for _ in range(2))
            bias = torch.zeros(3, 1, 1, 7, dtype=dtype)
            bias[0, ..., :3] = float("-inf")
            ref = _sdpa(q, k, v, bias, 0.2)
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            if torch.allclose(compiled(q, k, v, bias, 0.2), ref, atol=tol, rtol=tol):
                fn = compiled
        except Exception:  # no compiler / inductor cannot build here: SDPA it is
            fn = None
        _COMPILED_ATTENTION[dtype] = fn
    return _COMPILED_ATTENTION[dtype]


class _LlamaDecoder:
    """A lean forward pass for Llama-architecture models (what `agents.model.build_model` makes).

    Same math as transformers' LlamaForCausalLM (it reuses the model's rotary module), in about
    half the tensor ops and without per-module hooks: RoPE is applied to q and k at once, and the
    attention mask is an additive bias made once per call. On small policies decoding is bound by
    per-op overhead, so this is most of a step.

    On CPU the matmuls go through oneDNN with weights prepacked once (`_reorder_linear_weight`),
    with SiLU, the gate product and the residual adds fused into them: `F.linear` (MKL sgemm)
    reached ~100 GFLOPS per core on the AMD EPYC (AVX-512) machines here, the packed oneDNN path
    ~250. Elsewhere q/k/v and gate/up run as single `F.linear`s over concatenated weights. The
    packed/concatenated weights are copies, rebuilt whenever a parameter of the model changes
    (tracked by tensor version counters, so in-place optimizer steps are seen).
    """

    _PACK_BATCH = 32  # oneDNN's blocking hint: rows per matmul (decode batch); any row count works

    def __init__(self, model: PreTrainedModel, compile_attention: bool | None = None):
        cfg = model.config
        inner = model.model
        attn = inner.layers[0].self_attn
        self.model = model
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = attn.head_dim
        self.rotary = inner.rotary_emb
        p = next(model.parameters())
        self.onednn = p.device.type == "cpu" and _onednn_linear_works(p.dtype)
        # Decode steps (one query per row) may use the compiled attention; None = on CPU in bf16/fp16,
        # where torch's SDPA is slowest (26M model: 1.6x the engine's tokens/s in bf16; in fp32 +2%,
        # and -13% on a 1M model from the compiled call's overhead). CUDA keeps SDPA; so does prefill.
        if compile_attention is None:
            compile_attention = p.device.type == "cpu" and p.dtype in (torch.bfloat16, torch.float16)
        self.attend_one = _compiled_decode_attention(p.dtype) if compile_attention else None
        self._key = None

    @staticmethod
    def supports(model: PreTrainedModel) -> bool:
        cfg = getattr(model, "config", None)
        return (
            getattr(cfg, "model_type", None) == "llama"
            and getattr(cfg, "hidden_act", None) == "silu"
            and getattr(cfg, "pretraining_tp", 1) in (1, None)
            and hasattr(model, "model") and hasattr(model, "lm_head")
        )

    @torch.no_grad()
    def _refresh(self) -> None:
        key = tuple((p.data_ptr(), p._version) for p in self.model.parameters())
        if key == self._key:
            return
        inner, self._key = self.model.model, key

        def cat(*ts):
            return None if ts[0] is None else torch.cat(ts)

        def pack(w):
            return torch.ops.mkldnn._reorder_linear_weight(w.detach(), self._PACK_BATCH) if self.onednn else w

        self.embed = inner.embed_tokens.weight
        self.layers = []
        for layer in inner.layers:
            a, mlp = layer.self_attn, layer.mlp
            if self.onednn:
                ffn = (pack(mlp.gate_proj.weight), mlp.gate_proj.bias, pack(mlp.up_proj.weight), mlp.up_proj.bias)
            else:
                ffn = (cat(mlp.gate_proj.weight, mlp.up_proj.weight), cat(mlp.gate_proj.bias, mlp.up_proj.bias))
            self.layers.append((
                layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon,
                pack(cat(a.q_proj.weight, a.k_proj.weight, a.v_proj.weight)),
                cat(a.q_proj.bias, a.k_proj.bias, a.v_proj.bias),
                pack(a.o_proj.weight), a.o_proj.bias,
                layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon,
                ffn, pack(mlp.down_proj.weight), mlp.down_proj.bias, a.scaling,
            ))
        self.norm, self.norm_eps = inner.norm.weight, inner.norm.variance_epsilon
        self.lm_head, self.lm_bias = pack(self.model.lm_head.weight), self.model.lm_head.bias

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, kv_layers: Sequence,
                 mask: torch.Tensor, segments: Sequence[tuple[int, int, int]] | None = None) -> torch.Tensor:
        """input_ids, position_ids [n, t]; kv_layers: one object per layer whose `update(k, v)` stores
        the new keys/values and returns all of them; mask [n, 1, t, kv len]: bool (True = attend)
        or an additive bias; segments: optional (first row, end row, first column) groups whose
        attention reads the cache from that column on. Returns the logits of the last position [n, V]."""
        n, t = input_ids.shape
        H, KV, D = self.n_heads, self.n_kv, self.head_dim
        half = D // 2
        onednn = self.onednn
        if onednn:
            lp = torch.ops.mkldnn._linear_pointwise
            lp_binary = lp.binary
        x = F.embedding(input_ids, self.embed)
        hidden = (x.shape[-1],)
        cos, sin = self.rotary(x, position_ids)  # [n, t, D]
        # rotate_half(v) * sin == roll(v, D/2) * sin with the first half of sin negated
        sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
        cos, sin = cos[:, :, None], sin[:, :, None]  # [n, t, 1, D]: broadcast over heads
        # decode steps (one query per row) may take the compiled kernel; prefill always SDPA
        attend = self.attend_one if t == 1 and self.attend_one is not None else _sdpa
        for (w_in, eps_in, w_qkv, b_qkv, w_o, b_o, w_post, eps_post, ffn, w_down, b_down, scale), layer in zip(
            self.layers, kv_layers
        ):
            h = F.rms_norm(x, hidden, w_in, eps_in)
            qkv = lp(h, w_qkv, b_qkv, "none", [], "") if onednn else F.linear(h, w_qkv, b_qkv)
            qkv = qkv.view(n, t, H + 2 * KV, D)
            qk = qkv[:, :, : H + KV]
            qk = torch.addcmul(qk * cos, qk.roll(half, dims=-1), sin).transpose(1, 2)  # [n, H + KV, t, D]
            keys, values = layer.update(qk[:, H:], qkv[:, :, H + KV :].transpose(1, 2))
            q = qk[:, :H]
            o = attend(q, keys, values, mask, scale) if segments is None else torch.cat([
                attend(q[a:b], keys[a:b, :, c:], values[a:b, :, c:], mask[a:b, :, :, c:], scale)
                for a, b, c in segments
            ])
            o = o.transpose(1, 2).reshape(n, t, H * D)
            if onednn:
                x = lp_binary(o, x, w_o, b_o, "add")  # x + o_proj(o)
                h = F.rms_norm(x, hidden, w_post, eps_post)
                w_gate, b_gate, w_up, b_up = ffn
                act = lp_binary(h, lp(h, w_gate, b_gate, "swish", [], ""), w_up, b_up, "mul")  # silu(gate) * up
                x = lp_binary(act, x, w_down, b_down, "add")
            else:
                x = x + F.linear(o, w_o, b_o)
                gate, up = F.linear(F.rms_norm(x, hidden, w_post, eps_post), *ffn).chunk(2, dim=-1)
                x = x + F.linear(F.silu(gate) * up, w_down, b_down)
        x = F.rms_norm(x[:, -1], hidden, self.norm, self.norm_eps)
        return lp(x, self.lm_head, self.lm_bias, "none", [], "") if onednn else F.linear(x, self.lm_head, self.lm_bias)


@dataclass
class _Session:
    """What one conversation left in the cache: the ids fed to the model and their KV, compacted."""

    token_ids: list[int]
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (keys, values), each [kv heads, len, head dim]
    nbytes: int


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if list(a[:n]) == list(b[:n]):
        return n
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class TorchEngine:
    """Batched KV-cache generation with any Hugging Face causal LM.

    With `sessions` (one hashable key per prompt, e.g. an episode id), `generate` keeps the KV of
    each conversation after the call, and the next call with the same key re-runs only the part of
    the prompt that is new: a multi-turn episode prefills each observation once instead of
    re-reading the whole conversation every turn. Stored sessions are evicted least-recently-used
    beyond `max_sessions` or `max_session_bytes`, freed by `release`, and dropped by
    `update_weights` (their KV was computed by the old weights). `stats` counts prompt tokens run
    (`prefill_tokens`), served from sessions (`reused_tokens`) and generated.

    `fast_forward`: run Llama-architecture models through `_LlamaDecoder` (same math, fewer ops,
    oneDNN matmuls on CPU); other models always use their own forward. `compact_fraction`: cut
    finished rows out of the batch once this fraction has finished. `prefill_group_cost`: the
    fixed cost of one more prefill group, in padding tokens.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        pad_token_id: int,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_batch_size: int = 256,
        compact_fraction: float = 0.125,
        max_sessions: int = 1024,
        max_session_bytes: int = 2 * 1024**3,
        fast_forward: bool = True,
        prefill_group_cost: int = 32,
        compile_attention: bool | None = None,
    ):
        self.model = model.to(device=device, dtype=dtype).eval()
        # Llama-architecture policies run through a lean forward of the same math; anything else
        # through the model's own forward.
        # `compile_attention`: decode attention through a kernel compiled here (None = CPU in 16-bit
        # precision, when the probe compiles and agrees with SDPA; see _compiled_decode_attention).
        self._decoder = (_LlamaDecoder(self.model, compile_attention)
                         if fast_forward and _LlamaDecoder.supports(self.model) else None)
        # Prompts are prefilled in groups of similar length (lean path); one more group costs about
        # as much as this many padding tokens.
        self.prefill_group_cost = prefill_group_cost
        self.device = torch.device(device)
        self.dtype = dtype
        self.pad_token_id = pad_token_id
        self.max_batch_size = max_batch_size
        # Compacting copies the whole cache, so wait until enough rows have finished.
        self.compact_fraction = compact_fraction
        self.max_sessions = max_sessions
        self.max_session_bytes = max_session_bytes
        self._sessions: OrderedDict[Hashable, _Session] = OrderedDict()  # least recently used first
        self._session_bytes = 0
        # Counters since construction: prompt tokens run through the model, prompt tokens served
        # from stored sessions, and tokens generated.
        self.stats = {"prefill_tokens": 0, "reused_tokens": 0, "generated_tokens": 0}

    # -- sessions -----------------------------------------------------------------------------
    @property
    def num_sessions(self) -> int:
        return len(self._sessions)

    def release(self, sessions: Iterable[Hashable]) -> None:
        """Forget the stored KV of these sessions (unknown keys are ignored)."""
        for key in sessions:
            entry = self._sessions.pop(key, None)
            if entry is not None:
                self._session_bytes -= entry.nbytes

    def clear_sessions(self) -> None:
        self._sessions.clear()
        self._session_bytes = 0

    def _take_session(self, key: Hashable, prompt: Sequence[int]):
        """Pop `key`'s entry; return the KV (views) of its longest prefix shared with `prompt`."""
        entry = self._sessions.pop(key, None)
        if entry is None:
            return None
        self._session_bytes -= entry.nbytes
        # Keep at least one prompt token to run: its logits give the first new token. The KV of a
        # token depends only on the tokens before it, so any shared prefix is reusable.
        reuse = min(_common_prefix(entry.token_ids, prompt), len(prompt) - 1)
        if reuse == 0:
            return None
        return [(k[:, :reuse], v[:, :reuse]) for k, v in entry.kv]

    def _store_session(self, key: Hashable, token_ids: list[int], kv) -> None:
        assert kv[0][0].shape[1] == len(token_ids), "stored KV and token ids disagree"
        nbytes = sum(k.nbytes + v.nbytes for k, v in kv)
        self._sessions[key] = _Session(token_ids, kv, nbytes)
        self._session_bytes += nbytes
        while self._sessions and (
            len(self._sessions) > self.max_sessions or self._session_bytes > self.max_session_bytes
        ):
            _, old = self._sessions.popitem(last=False)
            self._session_bytes -= old.nbytes

    # -- weights ------------------------------------------------------------------------------
    def update_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state_dict, strict=True)
        self.clear_sessions()  # KV computed by the old weights is stale

    # -- generation ---------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        sessions: Sequence[Hashable] | None = None,
        choices: Sequence[Sequence[Sequence[int]] | None] | None = None,
    ) -> list[Completion]:
        """Complete every prompt. With `sessions` (one distinct key per prompt), reuse and keep the
        KV of each conversation: the stored ids of a session that are a prefix of its new prompt are
        not run again, and after the call the session holds prompt + completion (all but the last
        sampled token, which was never fed).

        `choices` (one entry per prompt, None = free): the token-id sequences a completion may be;
        decoding masks every token that would leave them (constrained decoding, e.g. a text game's
        admissible commands). Each choice should end in a stop token."""
        check_request(prompts, sessions)
        if choices is not None and len(choices) != len(prompts):
            raise ValueError(f"{len(choices)} choice lists for {len(prompts)} prompts")
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        if self._decoder is not None:
            self._decoder._refresh()  # the model's weights may have changed in place
        # Similar lengths share a chunk, so left padding wastes little.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        results: list[Completion | None] = [None] * len(prompts)
        for start in range(0, len(order), self.max_batch_size):
            idx = order[start : start + self.max_batch_size]
            chunk = [prompts[i] for i in idx]
            cached = None
            if sessions is not None:
                cached = [self._take_session(sessions[i], prompts[i]) for i in idx]
            trees = None if choices is None else [None if choices[i] is None else choice_tree(choices[i]) for i in idx]
            completions, kvs = self._generate_chunk(chunk, params, generator, cached, trees)
            for j, i in enumerate(idx):
                results[i] = completions[j]
                if sessions is not None:
                    fed = list(prompts[i]) + completions[j].token_ids[:-1]
                    self._store_session(sessions[i], fed, kvs[j])
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def _generate_chunk(self, prompts, params: SamplingParams, generator, cached=None, trees=None):
        """Generate for one batch. `cached` (sessions mode): per prompt None or the per-layer KV of
        its first r tokens. `trees`: per prompt None or its choice tree, walked as tokens are drawn.
        Returns the completions and, in sessions mode, each row's compacted KV.

        Cache columns: [0, C) hold each row's cached KV right-aligned (C = longest cached prefix),
        [C, W) the uncached prompt suffixes right-aligned (W = C + longest suffix), then one column
        per decode step. Pad columns are masked out; positions count each row's real tokens.
        """
        n, dev = len(prompts), self.device
        keep_kv = cached is not None
        reuse = [0] * n if cached is None else [0 if kv is None else kv[0][0].shape[1] for kv in cached]
        suffix_len = [len(p) - r for p, r in zip(prompts, reuse)]
        C, S = max(reuse), max(suffix_len)
        W = C + S
        cap = W + params.max_new_tokens
        # Each row's first valid cache column; the columns before it are padding that the lean path's
        # attention skips, so slots go in that order (and the prefill groups rows of similar length).
        first_col = [C - r if r else W - s for r, s in zip(reuse, suffix_len)]
        slots = sorted(range(n), key=lambda i: (first_col[i], -suffix_len[i]))
        if self._decoder is None:
            slots = list(range(n))
        ids_rows, pos_rows, mask_rows = [], [], []
        for i in slots:
            p, r, s = prompts[i], reuse[i], suffix_len[i]
            ids_rows.append([self.pad_token_id] * (S - s) + list(p[r:]))
            pos_rows.append([0] * (S - s) + list(range(r, r + s)))
            mask_rows.append([False] * (C - r) + [True] * r + [False] * (S - s) + [True] * s)
        input_ids = torch.tensor(ids_rows, dtype=torch.long, device=dev)
        positions = torch.tensor(pos_rows, dtype=torch.long, device=dev)
        # One mask for the whole call: decode columns are valid for every row (a finished row's
        # columns hold garbage, but it is never read: the row is compacted out or its KV cut).
        mask = torch.ones((n, cap), dtype=torch.bool, device=dev)
        mask[:, :W] = torch.tensor(mask_rows, dtype=torch.bool, device=dev)
        next_pos = torch.tensor([len(prompts[i]) for i in slots], dtype=torch.long, device=dev)
        stop = torch.as_tensor(params.stop_token_ids or [-1], device=dev)
        self.stats["prefill_tokens"] += sum(suffix_len)
        self.stats["reused_tokens"] += sum(reuse)

        cache = GrowingCache(self.model.config.num_hidden_layers, capacity=cap)
        slot_cached = [None if cached is None else cached[i] for i in slots]
        if self._decoder is not None:
            self._allocate(cache, slot_cached, [reuse[i] for i in slots], C, W, cap)
            logits = self._prefill_groups(input_ids, positions, cache, mask[:, :W], [suffix_len[i] for i in slots])
            slot_first = [first_col[i] for i in slots]
            segments = self._segments(slot_first, W + params.max_new_tokens // 2)
            # The lean decode takes the mask as an additive bias (0 / -inf), made once per call
            # rather than converted from booleans in every attention call.
            mask = _additive(mask, self.dtype)
        else:
            segments = None
            if C:
                self._allocate(cache, slot_cached, [reuse[i] for i in slots], C, C, cap)
            logits = self.model(
                input_ids=input_ids, attention_mask=mask[:, :W], position_ids=positions,
                past_key_values=cache, use_cache=True, logits_to_keep=1,
            ).logits[:, -1]  # [n, V]

        rows = torch.tensor(slots, dtype=torch.long, device=dev)  # batch slot -> prompt index
        done = torch.zeros(n, dtype=torch.bool, device=dev)  # finished but not yet compacted
        stop_step = torch.full((n,), -1, dtype=torch.long, device=dev)  # per prompt: step of its stop token
        kvs: list = [None] * n
        history = []  # per step: (prompt index per slot, token, logprob, live slots), kept on device
        allowed_log: list[list] = [[] for _ in range(n)]  # per prompt, per step: its allowed tokens
        n_done = 0
        for step in range(params.max_new_tokens):
            if trees is not None:
                slot_rows = rows.tolist()
                allowed = [allowed_next(trees[i], params.stop_token_ids) for i in slot_rows]
                for i, ids in zip(slot_rows, allowed):
                    allowed_log[i].append(ids)
                logits = mask_logits(logits, allowed)
            tokens, logps = sample_tokens(logits, params.temperature, params.top_p, generator)
            if trees is not None:
                for i, token in zip(slot_rows, tokens.tolist()):
                    if trees[i] is not None:
                        trees[i] = trees[i].get(token, {})
            live = ~done
            history.append((rows, tokens, logps, live))
            if params.stop_token_ids:
                hit_stop = torch.isin(tokens, stop) & live
                stop_step[rows[hit_stop]] = step
                done |= hit_stop
                n_done = int(done.sum())
            if n_done == len(rows) or step == params.max_new_tokens - 1:
                break
            if n_done >= max(1, int(self.compact_fraction * len(rows))):
                if keep_kv:  # the leaving rows take their KV with them
                    self._extract(cache, kvs, done.nonzero().flatten(), rows, stop_step, step, reuse, suffix_len, C, W)
                keep = (~done).nonzero().flatten()
                cache.batch_select_indices(keep)
                rows, mask, next_pos, tokens = rows[keep], mask[keep], next_pos[keep], tokens[keep]
                done, n_done = done[keep], 0
                if self._decoder is not None:
                    slot_first = [slot_first[k] for k in keep.tolist()]
                    segments = self._segments(slot_first, W + step + (params.max_new_tokens - step) // 2)
            # Feed this step's tokens; the KV for them lands in column W + step.
            logits = self._decode(tokens[:, None], next_pos[:, None], cache, mask[:, : W + step + 1], segments)
            next_pos = next_pos + 1
        if keep_kv:
            self._extract(cache, kvs, torch.arange(len(rows), device=dev), rows, stop_step, step, reuse,
                          suffix_len, C, W)
        completions = self._completions(history, stop_step >= 0)
        if trees is not None:  # a row is logged from step 0 on, so its first len(tokens) entries are its own
            for i, c in enumerate(completions):
                if trees[i] is not None:
                    c.allowed = allowed_log[i][: len(c.token_ids)]
        self.stats["generated_tokens"] += sum(len(c.token_ids) for c in completions)
        return completions, kvs

    def _decode(self, tokens, positions, cache, mask2d, segments) -> torch.Tensor:
        """One token per row; `mask2d` is boolean (model's forward) or an additive bias (lean path)."""
        if self._decoder is None:
            return self.model(
                input_ids=tokens, attention_mask=mask2d, position_ids=positions,
                past_key_values=cache, use_cache=True,
            ).logits[:, -1]
        return self._decoder(tokens, positions, cache.layers, mask2d[:, None, None, :], segments)

    def _segments(self, first_col: list[int], length: int) -> list[tuple[int, int, int]] | None:
        """Decode attention in groups of rows (slots sorted by first valid column), each reading the
        cache only from its own first valid column: the leading padding of short rows is skipped.
        None = one call over all columns."""
        cfg = self.model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        n_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        # one more attention call per layer costs about as much as reading this many rows x columns
        cost = max(1, (128 * 1024) // (2 * n_kv * head_dim * torch.finfo(self.dtype).bits // 8))
        groups = _length_groups([length - f for f in first_col], cost)
        if len(groups) == 1 and first_col[0] == 0:
            return None
        return [(a, b, min(first_col[a:b])) for a, b in groups]

    def _allocate(self, cache: GrowingCache, cached, reuse: list[int], C: int, zero_to: int, cap: int) -> None:
        """Give every layer buffers [n, kv heads, cap, head dim] holding each row's stored KV in
        columns [C - r, C); columns below `zero_to` start at 0 (masked columns must hold finite
        numbers: 0 x NaN is NaN in the attention sum)."""
        cfg = self.model.config
        n_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        n = len(reuse)
        for layer_idx, layer in enumerate(cache.layers):
            k = torch.empty((n, n_kv, cap, head_dim), dtype=self.dtype, device=self.device)
            v = torch.empty_like(k)
            k[:, :, :zero_to].zero_()
            v[:, :, :zero_to].zero_()
            for row, (kv, r) in enumerate(zip(cached, reuse)):
                if r:
                    k[row, :, C - r : C] = kv[layer_idx][0]
                    v[row, :, C - r : C] = kv[layer_idx][1]
            layer.preload(k, v, C)

    def _prefill_groups(self, input_ids, positions, cache: GrowingCache, mask2d, suffix_len: list[int]) -> torch.Tensor:
        """Lean path: run the uncached suffixes (rows sorted by length) in groups of similar length,
        each padded only to its own longest, writing into the shared buffers; suffixes end at column
        W in every group. Returns the logits of each row's last token [n, V]."""
        S, W = input_ids.shape[1], mask2d.shape[1]
        cols = torch.arange(W, device=self.device)
        logits = []
        for a, b in _length_groups(suffix_len, self.prefill_group_cost):
            s = max(suffix_len[a:b])
            start = W - s
            own = (start + torch.arange(s, device=self.device))[:, None]  # each query's own column
            # causal and not padding; a pad query sees itself only (a row of all -inf gives NaN)
            allowed = (mask2d[a:b, None, None, :] & (cols <= own)) | (cols == own)
            mask4 = _additive(allowed, self.dtype)
            views = [_RowsView(layer._k[a:b], layer._v[a:b], start) for layer in cache.layers]
            logits.append(self._decoder(input_ids[a:b, S - s :], positions[a:b, S - s :], views, mask4))
        for layer in cache.layers:
            layer.preload(layer._k, layer._v, W)
        return torch.cat(logits)

    @staticmethod
    def _extract(cache: GrowingCache, kvs: list, slots, rows, stop_step, step: int, reuse, suffix_len, C: int, W: int):
        """Copy out the valid KV columns of batch `slots`: cached prefix, prompt suffix, and the
        decode columns of the tokens that were fed (up to the row's stop step, or `step`)."""
        if len(slots) == 0:
            return
        prompt_idx = rows[slots].tolist()
        fed = stop_step[rows[slots]].tolist()
        dev = cache.layers[0]._k.device
        for slot, i, t in zip(slots.tolist(), prompt_idx, fed):
            t = step if t < 0 else t
            r, s = reuse[i], suffix_len[i]
            cols = torch.cat([torch.arange(C - r, C, device=dev), torch.arange(W - s, W + t, device=dev)])
            kvs[i] = [
                (layer._k[slot].index_select(1, cols), layer._v[slot].index_select(1, cols)) for layer in cache.layers
            ]

    @staticmethod
    def _completions(history, stopped: torch.Tensor) -> list[Completion]:
        """Regroup the step-major history into one Completion per prompt (one host copy)."""
        n = len(stopped)
        live = torch.cat([h[3] for h in history])
        rows = torch.cat([h[0] for h in history])[live]
        order = torch.argsort(rows, stable=True)  # stable: each prompt's tokens stay in time order
        counts = torch.bincount(rows, minlength=n).tolist()
        tokens = torch.cat([h[1] for h in history])[live][order].tolist()
        logps = torch.cat([h[2] for h in history])[live][order].tolist()
        stopped = stopped.tolist()
        out, start = [], 0
        for i, k in enumerate(counts):
            out.append(Completion(tokens[start : start + k], logps[start : start + k],
                                  "stop" if stopped[i] else "length"))
            start += k
        return out
