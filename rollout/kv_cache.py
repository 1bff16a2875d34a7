"""The embedded engine's KV cache: per layer, keys and values in preallocated buffers.

`GrowingCache` is a transformers `Cache` (the model's own forward can write into it) of
`GrowingLayer`s; `RowsView` lets one prefill group write into its rows of the shared buffers.
Buffer layout, per layer: keys and values each [batch, kv heads, capacity, head dim]; which
columns hold what is explained in `TorchEngine._generate_chunk` and docs/rollout.md.
"""
from __future__ import annotations

import torch
from transformers import PreTrainedConfig
from transformers.cache_utils import Cache, DynamicLayer


def kv_shape(config: PreTrainedConfig) -> tuple[int, int]:
    """(kv heads, head dim) of a model's attention layers."""
    n_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return n_kv, head_dim


class GrowingLayer(DynamicLayer):
    """A KV-cache layer in preallocated buffers that double when full.

    transformers' DynamicLayer concatenates on every step, copying the whole cache each token
    (quadratic in length); here a token costs one slice write, and the buffers grow rarely (never,
    when the cache is told its final length up front).
    """

    def __init__(self, capacity: int = 0):
        super().__init__()
        self._capacity = capacity
        self._k = self._v = None  # [batch, kv heads, capacity, head dim]
        self._len = 0  # columns filled

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
    """A KV cache of `GrowingLayer`s, one per decoder layer; `capacity` presizes the buffers."""

    def __init__(self, num_layers: int, capacity: int = 0):
        super().__init__(layers=[GrowingLayer(capacity) for _ in range(num_layers)])


class RowsView:
    """Rows of a `GrowingLayer`'s buffers (a view) that take new KV from column `start` on."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, start: int):
        self.keys, self.values, self.start = keys, values, start

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor):
        end = self.start + key_states.shape[2]
        self.keys[:, :, self.start : end] = key_states
        self.values[:, :, self.start : end] = value_states
        return self.keys[:, :, :end], self.values[:, :, :end]
