"""Host-memory KV caches for decoder.onnx on the CPU path; which one follows the graph's attention (manifest).

Shapes: L layers, KVH kv heads, D head dim, n cached positions, S new positions, M max length.

Fused attention (com.microsoft.GroupQueryAttention, `SharedKVCache`): one [1,KVH,M,D] buffer per (layer,
key|value) is bound as both past and present. The op writes the S new positions at n..n+S-1 in place and reads
the first n+S; the attention mask of n+S ones tells it n. Cost per step: reading the cache once inside the
attention - no Concat, no copy, no allocation. The cached length is one integer (`length`): dropping cached
positions is setting it lower.

Unfused attention (`KVCache`): the decoder takes past [1,KVH,n,D] and returns present = concat(past, new)
[1,KVH,n+S,D]. A [1,KVH,M,D] buffer sliced to n positions is NOT contiguous (KVH > 1), so feeding slices of one
buffer would cost a copy of the whole cache per step on top of the decoder's own Concat. Instead each (layer,
key|value) has two flat buffers of KVH*M*D elements used in turn: past is a prefix of buffer A viewed as
[1,KVH,n,D] (contiguous, no copy), present is bound to a prefix of buffer B viewed as [1,KVH,n+S,D], then A and
B swap. Cost per step: the decoder's Concat - one read and one write of the whole cache,
2 * L * 2 * KVH * n * D * itemsize bytes (StableLM-1.6B fp32 at n=1000: 0.4 GB read + 0.4 GB written,
tens of ms on a 2-core board). Memory: twice the cache.

Memory: the unfused buffers commit pages only as far as they are used (np.empty leaves untouched pages
unmapped). GroupQueryAttention's CPU kernel touches the whole bound buffer on its first run (onnxruntime 1.32:
a StableLM-1.6B cache sized for the 4096-position context is 1.6 GB resident after a single token, and faulting
it in costs ~1.9 s of the first token), so `SharedKVCache` holds `capacity` positions and grows as the cache
needs them.
"""
from __future__ import annotations

import numpy as np

from runtime.errors import UserError

KINDS = ("key", "value")


def check_room(cached: int, new_tokens: int, max_len: int) -> None:
    if cached + new_tokens > max_len:
        raise UserError(f"context full: {cached} cached + {new_tokens} new positions exceed the maximum of "
                        f"{max_len}; use a shorter prompt or fewer --max-new-tokens")


class _Cache:
    """What both caches share: geometry, the cached length n, the room check."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, max_len: int, dtype: np.dtype):
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.max_len = max_len
        self.dtype = np.dtype(dtype)
        self.length = 0  # n: positions cached

    def reset(self) -> None:
        self.length = 0

    def check_room(self, new_tokens: int) -> None:
        check_room(self.length, new_tokens, self.max_len)


class SharedKVCache(_Cache):
    """Fused attention: past and present are the same [1,KVH,C,D] buffer per (layer, key|value), C = capacity.

    `reserve` grows C (x1.5 at least, in whole GRAIN positions, at most max_len) before a step that needs
    more, copying the cached positions; the decoder rebinds the buffers when it did. A 656-position prompt
    with a short answer holds 768 positions, not the context's 4096."""

    GRAIN = 256

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, max_len: int, dtype: np.dtype):
        super().__init__(num_layers, num_kv_heads, head_dim, max_len, dtype)
        self.capacity = 0
        self._buffers = self._allocate(min(max_len, self.GRAIN))

    def _allocate(self, capacity: int) -> np.ndarray:
        self.capacity = capacity
        # [L, 2 (key, value), 1, KVH, C, D]
        return np.empty((self.num_layers, len(KINDS), 1, self.num_kv_heads, capacity, self.head_dim), self.dtype)

    def reserve(self, new_tokens: int) -> bool:
        """Room for new_tokens more positions (within max_len: check_room first); True when the buffers moved."""
        needed = self.length + new_tokens
        if needed <= self.capacity:
            return False
        grains = -(-needed // self.GRAIN)
        old = self._buffers
        self._buffers = self._allocate(min(self.max_len, max(grains * self.GRAIN, self.capacity * 3 // 2)))
        self._buffers[..., :self.length, :] = old[..., :self.length, :]
        return True

    def past(self, layer: int, kind: int) -> np.ndarray:
        """[1,KVH,C,D]: the whole buffer (the first n positions valid)."""
        return self._buffers[layer, kind]

    def present_buffer(self, layer: int, kind: int, new_tokens: int) -> np.ndarray:
        """The same buffer: the op writes positions n..n+S-1 into it."""
        return self._buffers[layer, kind]

    def commit(self, new_tokens: int) -> None:
        self.length += new_tokens

    def cached(self) -> np.ndarray:
        """[L,2,KVH,n,D] view of the cached positions (key, value per layer), as stored."""
        return self._buffers[:, :, 0, :, :self.length]

    def keep(self, positions: int) -> None:
        """Drop every cached position after the first `positions` (a follow-up turn's shared prefix)."""
        if not 0 <= positions <= self.length:
            raise ValueError(f"cannot keep {positions} of {self.length} cached positions")
        self.length = positions


class KVCache(_Cache):
    """Unfused attention: ping-pong buffers, present = concat(past, new) written into the other one."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, max_len: int, dtype: np.dtype):
        super().__init__(num_layers, num_kv_heads, head_dim, max_len, dtype)
        # [2 (ping-pong), L, 2 (key, value), KVH*M*D]
        self._buffers = np.empty((2, num_layers, len(KINDS), num_kv_heads * max_len * head_dim), self.dtype)
        self._current = 0

    def past(self, layer: int, kind: int) -> np.ndarray:
        """[1,KVH,n,D] view of the cached positions."""
        return self._view(self._current, layer, kind, self.length)

    def present_buffer(self, layer: int, kind: int, new_tokens: int) -> np.ndarray:
        """[1,KVH,n+S,D] view the decoder writes present into (the other buffer)."""
        return self._view(1 - self._current, layer, kind, self.length + new_tokens)

    def commit(self, new_tokens: int) -> None:
        """The present buffers now hold n+S positions: make them the cache."""
        self._current = 1 - self._current
        self.length += new_tokens

    def keep(self, positions: int) -> None:
        """Truncate to the first `positions` (a follow-up turn reusing a shared prefix). A prefix of the
        [1,KVH,n,D] view is not a [1,KVH,positions,D] view of the same memory, so it is copied into the other
        buffer once: one read and write of the kept positions, far less than prefilling them again."""
        if not 0 <= positions <= self.length:
            raise ValueError(f"cannot keep {positions} of {self.length} cached positions")
        if positions == self.length:
            return
        for layer in range(self.num_layers):
            for kind in range(len(KINDS)):
                kept = self._view(1 - self._current, layer, kind, positions)
                kept[...] = self.past(layer, kind)[:, :, :positions]
        self._current = 1 - self._current
        self.length = positions

    def _view(self, side: int, layer: int, kind: int, positions: int) -> np.ndarray:
        size = self.num_kv_heads * positions * self.head_dim
        return self._buffers[side, layer, kind, :size].reshape(1, self.num_kv_heads, positions, self.head_dim)
