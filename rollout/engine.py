"""The embedded torch inference engine: batched decoding over a KV cache.

One interface for every backend (this one, vLLM): `InferenceEngine.generate` takes token-id
prompts and returns new token ids with their sampling log-probs; `update_weights` loads a new
policy state dict; `release` forgets stored conversations.

Why it is fast on small policies: the prompt is run once (prefill, in groups of similar length so
padding wastes little), then each step feeds one token per live sequence against a preallocated
cache; sequences that stop are compacted out of the batch (and out of the cache), so finished
rows stop costing compute. With `sessions`, a multi-turn episode keeps its KV between turns and
each turn prefills only its new tokens. docs/rollout.md has the details and measurements.

Where the parts live:
    rollout/engine.py     this file: the interface, sampling, `TorchEngine` (batching, sessions, decode loop)
    rollout/decoders/    the backbone's cached forward (`decoder_for(model)`; the model's own forward otherwise)
    rollout/kernels.py    the attention kernels and the oneDNN probe that forward uses
    rollout/kv_cache.py   the KV cache buffers
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from rollout.decoders import RoutingTrace, decoder_for
from rollout.kv_cache import GrowingCache, RowsView, kv_shape


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
    # a mixture-of-experts decoder's routing (rollout/decoders/), for routing replay: the experts
    # [tokens, layers, k] of every token this call ran, i.e. the prompt from index `routed_from` on
    # (the tokens before it came from the session's KV) and then each completion token but the last
    routed_experts: torch.Tensor | None = None
    routed_from: int = 0


def check_request(
    prompts: Sequence[Sequence[int]],
    sessions: Sequence[Hashable] | None,
    choices: Sequence[Sequence[Sequence[int]] | None] | None = None,
) -> None:
    """What every backend's generate requires of its arguments."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (a BOS token at least)")
    if sessions is not None:
        if len(sessions) != len(prompts):
            raise ValueError(f"got {len(sessions)} sessions for {len(prompts)} prompts")
        if len(set(sessions)) != len(sessions):
            raise ValueError("session keys must be distinct within one generate call")
    if choices is not None and len(choices) != len(prompts):
        raise ValueError(f"{len(choices)} choice lists for {len(prompts)} prompts")


class InferenceEngine(ABC):
    """What every backend offers (`TorchEngine` here, `rollout.vllm_engine.VLLMEngine`)."""

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        sessions: Sequence[Hashable] | None = None,
        choices: Sequence[Sequence[Sequence[int]] | None] | None = None,
    ) -> list[Completion]:
        """Complete every prompt (one `Completion` each, in order). With `sessions` (one distinct key
        per prompt), reuse and keep the KV of each conversation: the stored ids of a session that are
        a prefix of its new prompt are not run again, and after the call the session holds prompt +
        completion (all but the last sampled token, which was never fed).

        `choices` (one entry per prompt, None = free): the token-id sequences a completion may be;
        decoding masks every token that would leave them (constrained decoding, e.g. a text game's
        admissible commands). Each choice should end in a stop token."""
        check_request(prompts, sessions, choices)
        return self._generate(prompts, params, sessions, choices)

    @abstractmethod
    def _generate(self, prompts, params: SamplingParams, sessions, choices) -> list[Completion]:
        """`generate` on arguments that passed `check_request`."""

    @abstractmethod
    def update_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load new policy weights in place (names as in the model's `state_dict`)."""

    @abstractmethod
    def release(self, sessions: Iterable[Hashable]) -> None:
        """Forget the stored conversations of these session keys."""


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



@dataclass
class _Layout:
    """Where one chunk's prompts sit in the cache columns (see `TorchEngine._generate_chunk`)."""

    reuse: list[int]  # per prompt: leading tokens whose KV comes from its session
    suffix_len: list[int]  # per prompt: tokens still to run through the model (prefill)
    C: int  # columns [0, C): reused KV, right-aligned
    W: int  # columns [C, W): uncached suffixes, right-aligned; decode step k writes column W + k
    first_col: list[int]  # per prompt: its first valid column
    slots: list[int]  # batch slot -> prompt index


@dataclass
class _Batch:
    """The rows still in the batch while a chunk decodes (finished rows leave at compaction)."""

    rows: torch.Tensor  # [b] batch slot -> prompt index
    mask: torch.Tensor  # [b, cap] valid columns: bool (model's forward) or an additive bias (decoder)
    next_pos: torch.Tensor  # [b] position of the token fed next
    first_col: list[int]  # per slot: its first valid column
    segments: list[tuple[int, int, int]] | None  # decoder: row groups of the decode attention
    done: torch.Tensor  # [b] finished but not yet compacted out
    n_done: int = 0


class TorchEngine(InferenceEngine):
    """Batched KV-cache generation with any Hugging Face causal LM.

    With `sessions` (one hashable key per prompt, e.g. an episode id), `generate` keeps the KV of
    each conversation after the call, and the next call with the same key re-runs only the part of
    the prompt that is new: a multi-turn episode prefills each observation once instead of
    re-reading the whole conversation every turn. Stored sessions are evicted least-recently-used
    beyond `max_sessions` or `max_session_bytes`, freed by `release`, and dropped by
    `update_weights` (their KV was computed by the old weights). `stats` counts prompt tokens run
    (`prefill_tokens`), served from sessions (`reused_tokens`) and generated.

    `fast_forward`: run the model through its cached forward in rollout/decoders/ when there is
    one (Llama, Qwen2-MoE: same math, fewer ops, oneDNN matmuls on CPU); other models always use
    their own forward. A mixture-of-experts decoder also reports the experts it routed each token
    to (`Completion.routed_experts`, for the learner's routing replay). `compact_fraction`: cut
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
        # The backbone's lean cached forward (rollout/decoders/), or None: the model's own forward.
        # `compile_attention`: decode attention through a kernel compiled here (None = CPU in 16-bit
        # precision, when the probe compiles and agrees with SDPA; see rollout/kernels.py).
        self._decoder = decoder_for(self.model, compile_attention) if fast_forward else None
        # Prompts are prefilled in groups of similar length (decoder path); one more group costs
        # about as much as this many padding tokens.
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
        self._trace: RoutingTrace | None = None  # the running chunk's routing (a MoE decoder's)

    @property
    def decoder_attention(self) -> str | None:
        """Which decode attention the cached forward runs, and why (None: the model's own forward)."""
        return getattr(self._decoder, "attention_choice", None)

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
    def _generate(self, prompts, params: SamplingParams, sessions, choices) -> list[Completion]:
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        if self._decoder is not None:
            self._decoder.refresh()  # the model's weights may have changed in place
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
        n, max_new = len(prompts), params.max_new_tokens
        layout = self._layout(prompts, cached)
        if getattr(self._decoder, "records_routing", False):
            self._trace = RoutingTrace(layout.slots)
        cache, logits, batch = self._prefill(prompts, layout, cached, max_new)
        stop = torch.as_tensor(params.stop_token_ids or [-1], device=self.device)
        stop_step = torch.full((n,), -1, dtype=torch.long, device=self.device)  # per prompt: step of its stop token
        kvs: list = [None] * n  # sessions mode: per prompt, its KV once extracted
        history = []  # per step: (prompt index per slot, token, logprob, live slots), kept on device
        allowed_log: list[list] = [[] for _ in range(n)]  # per prompt, per step: its allowed tokens
        for step in range(max_new):
            tokens, logps = self._sample_step(logits, batch.rows, params, generator, trees, allowed_log)
            live = ~batch.done
            history.append((batch.rows, tokens, logps, live))
            if params.stop_token_ids:
                self._mark_stops(batch, tokens, live, stop, stop_step, step)
            if batch.n_done == len(batch.rows) or step == max_new - 1:
                break
            if batch.n_done >= max(1, int(self.compact_fraction * len(batch.rows))):
                if cached is not None:  # the leaving rows take their KV with them
                    self._extract(cache, kvs, batch.done.nonzero().flatten(), batch.rows, stop_step, step, layout)
                tokens = self._compact(batch, cache, tokens, layout.W + step + (max_new - step) // 2)
            # Feed this step's tokens; the KV for them lands in column W + step.
            logits = self._decode(tokens[:, None], batch.next_pos[:, None], cache,
                                  batch.mask[:, : layout.W + step + 1], batch.segments)
            if self._trace is not None:
                self._trace.decode(batch.rows, self._decoder.routed_experts())
            batch.next_pos = batch.next_pos + 1
        if cached is not None:
            self._extract(cache, kvs, torch.arange(len(batch.rows), device=self.device), batch.rows, stop_step,
                          step, layout)
        completions = self._completions(history, stop_step >= 0, trees, allowed_log)
        if self._trace is not None:
            routed = self._trace.per_prompt([len(c.token_ids) - 1 for c in completions])
            for c, experts, reuse in zip(completions, routed, layout.reuse):
                c.routed_experts, c.routed_from = experts, reuse
            self._trace = None
        self.stats["generated_tokens"] += sum(len(c.token_ids) for c in completions)
        return completions, kvs

    def _layout(self, prompts, cached) -> _Layout:
        """Which cache columns each prompt's reused KV and uncached suffix take, and the batch order."""
        n = len(prompts)
        reuse = [0] * n if cached is None else [0 if kv is None else kv[0][0].shape[1] for kv in cached]
        suffix_len = [len(p) - r for p, r in zip(prompts, reuse)]
        C = max(reuse)
        W = C + max(suffix_len)
        # Each row's first valid cache column; the columns before it are padding that the decoder's
        # attention skips, so slots go in that order (and the prefill groups rows of similar length).
        first_col = [C - r if r else W - s for r, s in zip(reuse, suffix_len)]
        slots = sorted(range(n), key=lambda i: (first_col[i], -suffix_len[i]))
        if self._decoder is None:
            slots = list(range(n))
        return _Layout(reuse, suffix_len, C, W, first_col, slots)

    def _prefill(self, prompts, layout: _Layout, cached, max_new_tokens: int):
        """Run every row's uncached prompt suffix into a new cache sized for the whole call.
        Returns the cache, the logits of each row's last prompt token [n, V] and the batch to decode."""
        n, dev, C, W = len(prompts), self.device, layout.C, layout.W
        cap = W + max_new_tokens
        input_ids, positions, mask = self._padded_prompts(prompts, layout, cap)
        self.stats["prefill_tokens"] += sum(layout.suffix_len)
        self.stats["reused_tokens"] += sum(layout.reuse)

        cache = GrowingCache(self.model.config.num_hidden_layers, capacity=cap)
        slots = layout.slots
        slot_cached = [None if cached is None else cached[i] for i in slots]
        slot_reuse = [layout.reuse[i] for i in slots]
        slot_suffix = [layout.suffix_len[i] for i in slots]
        first_col = [layout.first_col[i] for i in slots]
        if self._decoder is not None:
            self._allocate(cache, slot_cached, slot_reuse, C, W, cap)
            logits = self._prefill_groups(input_ids, positions, cache, mask[:, :W], slot_suffix)
            segments = self._segments(first_col, W + max_new_tokens // 2)
            # The decoder takes the mask as an additive bias (0 / -inf), made once per call
            # rather than converted from booleans in every attention call.
            mask = _additive(mask, self.dtype)
        else:
            segments = None
            if C:
                self._allocate(cache, slot_cached, slot_reuse, C, C, cap)
            logits = self.model(
                input_ids=input_ids, attention_mask=mask[:, :W], position_ids=positions,
                past_key_values=cache, use_cache=True, logits_to_keep=1,
            ).logits[:, -1]  # [n, V]
        batch = _Batch(
            rows=torch.tensor(slots, dtype=torch.long, device=dev),
            mask=mask,
            next_pos=torch.tensor([len(prompts[i]) for i in slots], dtype=torch.long, device=dev),
            first_col=first_col,
            segments=segments,
            done=torch.zeros(n, dtype=torch.bool, device=dev),
        )
        return cache, logits, batch

    def _padded_prompts(self, prompts, layout: _Layout, cap: int):
        """The uncached suffixes left-padded to one length: input_ids and positions [n, S] in slot
        order, and the attention mask [n, cap] over every cache column of the call (True = valid)."""
        C, W, dev = layout.C, layout.W, self.device
        S = W - C
        ids_rows, pos_rows, mask_rows = [], [], []
        for i in layout.slots:
            p, r, s = prompts[i], layout.reuse[i], layout.suffix_len[i]
            ids_rows.append([self.pad_token_id] * (S - s) + list(p[r:]))
            pos_rows.append([0] * (S - s) + list(range(r, r + s)))
            mask_rows.append([False] * (C - r) + [True] * r + [False] * (S - s) + [True] * s)
        input_ids = torch.tensor(ids_rows, dtype=torch.long, device=dev)
        positions = torch.tensor(pos_rows, dtype=torch.long, device=dev)
        # One mask for the whole call: decode columns are valid for every row (a finished row's
        # columns hold garbage, but it is never read: the row is compacted out or its KV cut).
        mask = torch.ones((len(prompts), cap), dtype=torch.bool, device=dev)
        mask[:, :W] = torch.tensor(mask_rows, dtype=torch.bool, device=dev)
        return input_ids, positions, mask

    @staticmethod
    def _sample_step(logits, rows, params: SamplingParams, generator, trees, allowed_log) -> tuple:
        """Draw each row's next token (within its choice tree, if it has one, which it then walks
        down); returns tokens [b] and their log-probs [b]."""
        if trees is None:
            return sample_tokens(logits, params.temperature, params.top_p, generator)
        slot_rows = rows.tolist()
        allowed = [allowed_next(trees[i], params.stop_token_ids) for i in slot_rows]
        for i, ids in zip(slot_rows, allowed):
            allowed_log[i].append(ids)
        tokens, logps = sample_tokens(mask_logits(logits, allowed), params.temperature, params.top_p, generator)
        for i, token in zip(slot_rows, tokens.tolist()):
            if trees[i] is not None:
                trees[i] = trees[i].get(token, {})
        return tokens, logps

    @staticmethod
    def _mark_stops(batch: _Batch, tokens, live, stop, stop_step, step: int) -> None:
        """Rows whose token this step is a stop token are done; record the step per prompt."""
        hit_stop = torch.isin(tokens, stop) & live
        stop_step[batch.rows[hit_stop]] = step
        batch.done |= hit_stop
        batch.n_done = int(batch.done.sum())

    def _compact(self, batch: _Batch, cache: GrowingCache, tokens, horizon: int) -> torch.Tensor:
        """Cut the finished rows out of the batch and the cache; returns the remaining rows' tokens.
        `horizon`: the cache length the new attention segments are planned for."""
        keep = (~batch.done).nonzero().flatten()
        cache.batch_select_indices(keep)
        batch.rows, batch.mask, batch.next_pos = batch.rows[keep], batch.mask[keep], batch.next_pos[keep]
        batch.done, batch.n_done = batch.done[keep], 0
        if self._decoder is not None:
            batch.first_col = [batch.first_col[k] for k in keep.tolist()]
            batch.segments = self._segments(batch.first_col, horizon)
        return tokens[keep]

    def _decode(self, tokens, positions, cache, mask2d, segments) -> torch.Tensor:
        """One token per row; `mask2d` is boolean (model's forward) or an additive bias (decoder)."""
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
        n_kv, head_dim = kv_shape(self.model.config)
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
        n_kv, head_dim = kv_shape(self.model.config)
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
        """Decoder path: run the uncached suffixes (rows sorted by length) in groups of similar
        length, each padded only to its own longest, writing into the shared buffers; suffixes end
        at column W in every group. Returns the logits of each row's last token [n, V]."""
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
            views = [RowsView(layer._k[a:b], layer._v[a:b], start) for layer in cache.layers]
            logits.append(self._decoder(input_ids[a:b, S - s :], positions[a:b, S - s :], views, mask4))
            if self._trace is not None:
                self._trace.prefill(a, suffix_len[a:b], self._decoder.routed_experts())
        for layer in cache.layers:
            layer.preload(layer._k, layer._v, W)
        return torch.cat(logits)

    @staticmethod
    def _extract(cache: GrowingCache, kvs: list, slots, rows, stop_step, step: int, layout: _Layout) -> None:
        """Copy out the valid KV columns of batch `slots`: cached prefix, prompt suffix, and the
        decode columns of the tokens that were fed (up to the row's stop step, or `step`)."""
        if len(slots) == 0:
            return
        prompt_idx = rows[slots].tolist()
        fed = stop_step[rows[slots]].tolist()
        dev = cache.layers[0]._k.device
        C, W = layout.C, layout.W
        for slot, i, t in zip(slots.tolist(), prompt_idx, fed):
            t = step if t < 0 else t
            r, s = layout.reuse[i], layout.suffix_len[i]
            cols = torch.cat([torch.arange(C - r, C, device=dev), torch.arange(W - s, W + t, device=dev)])
            kvs[i] = [
                (layer._k[slot].index_select(1, cols), layer._v[slot].index_select(1, cols)) for layer in cache.layers
            ]

    @staticmethod
    def _completions(history, stopped: torch.Tensor, trees=None, allowed_log=None) -> list[Completion]:
        """Regroup the step-major history into one Completion per prompt (one host copy), with the
        tokens allowed at each step for rows that had choices."""
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
        if trees is not None:  # a row is logged from step 0 on, so its first len(tokens) entries are its own
            for i, c in enumerate(out):
                if trees[i] is not None:
                    c.allowed = allowed_log[i][: len(c.token_ids)]
        return out
