"""The low-level ops a decoder forward (rollout/decoders/) is built from, each with a probe that
says whether it works on this machine.

* attention: torch's SDPA (`sdpa`), and for decode steps (one query per row) the same math as
  plain reductions (`decode_attention`), compiled by inductor (`compiled_decode_attention`);
  both take `(q, k, v, bias, scale)` and read grouped-query heads without repeating k/v;
  `pick_decode_attention` times the two on this CPU and says which one decode steps use.
* matmuls: whether oneDNN's prepacked linear ops run here and agree with `F.linear`
  (`onednn_linear_works`).

Why each exists, and what it gained, is in docs/rollout.md.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """torch's attention. q [n, H, t, D]; k, v [n, KV, T, D]; bias [n, 1, t, T] additive (0 / -inf)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Attention for one query per row, written as plain reductions for torch.compile to fuse.

    q [n, H, 1, D]; k, v [n, KV, T, D] (H a multiple of KV: grouped-query heads share k/v);
    bias [n, 1, 1, T] additive (0 / -inf). Returns [n, H, 1, D]. Inductor turns this into one
    loop over (row, head) that streams K and V once, accumulating in fp32; torch's CPU SDPA is
    slow on this shape (docs/rollout.md)."""
    n, H, _, D = q.shape
    KV, dtype = k.shape[1], v.dtype
    q = q.reshape(n, KV, H // KV, 1, D).float()  # [n, KV, G, 1, D]: G query heads per k/v head
    s = (q * k[:, :, None].float()).sum(-1) * scale + bias.float()  # [n, KV, G, T]
    p = torch.softmax(s, dim=-1)
    o = (p[..., None] * v[:, :, None].float()).sum(-2)  # [n, KV, G, D]
    return o.reshape(n, H, 1, D).to(dtype)


_COMPILED_ATTENTION: dict[torch.dtype, object] = {}  # dtype -> compiled function, or None if it failed


def compiled_decode_attention(dtype: torch.dtype):
    """`decode_attention` compiled by inductor for CPU, or None where compiling fails (no C++
    compiler, an unsupported build) or disagrees with SDPA. Probed once per process and dtype."""
    if dtype not in _COMPILED_ATTENTION:
        fn = None
        try:
            compiled = torch.compile(decode_attention, dynamic=True, fullgraph=True)
            g = torch.Generator().manual_seed(0)  # leave the global RNG alone
            q = torch.randn(3, 4, 1, 32, generator=g).to(dtype)
            k, v = (torch.randn(3, 2, 7, 32, generator=g).to(dtype) for _ in range(2))
            bias = torch.zeros(3, 1, 1, 7, dtype=dtype)
            bias[0, ..., :3] = float("-inf")
            ref = sdpa(q, k, v, bias, 0.2)
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            if torch.allclose(compiled(q, k, v, bias, 0.2), ref, atol=tol, rtol=tol):
                fn = compiled
        except Exception:  # no compiler / inductor cannot build here: SDPA it is
            fn = None
        _COMPILED_ATTENTION[dtype] = fn
    return _COMPILED_ATTENTION[dtype]


_PICKED: dict[tuple, tuple] = {}  # (dtype, H, KV, D) -> (compiled function or None, reason)


def _best_seconds(fn, reps: int = 5, calls: int = 3) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def _time_decode_kernels(compiled, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int) -> tuple[float, float]:
    """Seconds per call of SDPA and of `compiled` on a decode step of 32 rows x 128 cached columns."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(32, heads, 1, head_dim, generator=g).to(dtype)
    k, v = (torch.randn(32, kv_heads, 128, head_dim, generator=g).to(dtype) for _ in range(2))
    bias = torch.zeros(32, 1, 1, 128, dtype=dtype)
    return _best_seconds(lambda: sdpa(q, k, v, bias, 0.125)), _best_seconds(lambda: compiled(q, k, v, bias, 0.125))


def pick_decode_attention(dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int,
                          margin: float = 0.9) -> tuple[object | None, str]:
    """The compiled decode attention if it builds, agrees with SDPA and beats it on this CPU, else
    None (use SDPA); with the reason, for the run log. Which one is faster depends on the CPU: on
    an AMD EPYC the compiled kernel took 0.6x SDPA's time in bf16, on an Intel Xeon with AMX SDPA
    took 0.5-0.7x the compiled kernel's (docs/rollout.md). Timed once per process and shape (~50 ms
    after the kernel is compiled); the compiled kernel must take less than `margin` x SDPA's time,
    so that timing noise does not flip the choice between near-equals."""
    key = (dtype, heads, kv_heads, head_dim)
    if key not in _PICKED:
        compiled = compiled_decode_attention(dtype)
        if compiled is None:
            _PICKED[key] = None, "sdpa (the compiled kernel does not build or agree here)"
        else:
            t_sdpa, t_compiled = _time_decode_kernels(compiled, dtype, heads, kv_heads, head_dim)
            ratio = t_compiled / t_sdpa
            if t_compiled < margin * t_sdpa:
                _PICKED[key] = compiled, f"compiled ({ratio:.2f}x SDPA's time on this CPU)"
            else:
                _PICKED[key] = None, f"sdpa (the compiled kernel took {ratio:.2f}x its time on this CPU)"
    return _PICKED[key]


def onednn_linear_works(dtype: torch.dtype) -> bool:
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
