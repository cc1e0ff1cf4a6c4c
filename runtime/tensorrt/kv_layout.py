"""Where the decoder's tensors live on the device, and the bindings of one step (pure arithmetic, no CUDA).

Shapes: L layers, KVH kv heads, D head dim, M max positions, n cached positions, S new positions, H hidden.

The KV cache is one allocation of mode.copies x [L, 2 (key, value), M*KVH*D elements] (memory.kv_cache_bytes,
memory.KVMode). APPEND (one copy): the engine was built from the position-major graph of
export/tensorrt_kv_append.py - past [1,n,KVH,D] is the prefix of its slot and present [1,S,KVH,D] (the new
positions only) is bound right after it, at byte offset n*KVH*D*itemsize. CONCAT (two copies, the contract
graph): past [1,KVH,n,D] is a prefix of one copy, present = concat(past, new) [1,KVH,n+S,D] is written into the
other, and they swap after each step (runtime/kv_cache.py does the same on the host).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.kv_cache import KINDS

from .memory import ALIGNMENT, KVMode, kv_cache_bytes, kv_slot_bytes

Dims = tuple[int, ...]


def position_table(max_len: int, dtype) -> np.ndarray:
    """[M, ALIGNMENT/itemsize] with row n = n, ...: row n's address is an aligned [1,1] position_ids = n."""
    dtype = np.dtype(dtype)
    table = np.zeros((max_len, ALIGNMENT // dtype.itemsize), dtype)
    table[:, 0] = np.arange(max_len)
    return table


@dataclass(frozen=True)
class KVLayout:
    """One device block of mode.copies x [L, 2 (key, value), M*KVH*D] elements; see the module docstring."""
    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_len: int
    itemsize: int
    mode: KVMode = KVMode.CONCAT

    @property
    def slot_bytes(self) -> int:
        return kv_slot_bytes(self.num_kv_heads, self.head_dim, self.max_len, self.itemsize)

    @property
    def nbytes(self) -> int:
        return kv_cache_bytes(self.num_layers, self.num_kv_heads, self.head_dim, self.max_len, self.itemsize,
                              self.mode)

    def offset(self, side: int, layer: int, kind: int) -> int:
        return ((side * self.num_layers + layer) * len(KINDS) + kind) * self.slot_bytes

    def shape(self, positions: int) -> Dims:
        if self.mode is KVMode.APPEND:
            return (1, positions, self.num_kv_heads, self.head_dim)  # [1,n,KVH,D], a prefix of the slot
        return (1, self.num_kv_heads, positions, self.head_dim)  # [1,KVH,n,D], contiguous in a slot

    def addresses(self, base: int, layer: int, kind: int, cached: int, side: int) -> tuple[int, int]:
        """(past, present) addresses of one (layer, key|value) for a step after `cached` positions."""
        if self.mode is KVMode.APPEND:
            slot = base + self.offset(0, layer, kind)
            return slot, slot + cached * self.num_kv_heads * self.head_dim * self.itemsize
        return base + self.offset(side, layer, kind), base + self.offset(1 - side, layer, kind)

    def next_side(self, side: int) -> int:
        """The copy that holds the cache after a step from `side`."""
        return side if self.mode is KVMode.APPEND else 1 - side


@dataclass(frozen=True)
class DecoderBuffers:
    """Device addresses of the decoder's buffers."""
    embeds: int  # [M,H] in the decoder's input dtype
    mask: int  # ones [M]
    positions: int  # arange [M]: prefill's position_ids
    position_table: int  # M slots of ALIGNMENT bytes, slot n holding n: decode's position_ids
    logits: int  # [1,V]
    kv: int  # KVLayout.nbytes


def decoder_bindings(layout: KVLayout, buffers: DecoderBuffers, hidden: int, cached: int, new: int,
                     side: int) -> tuple[dict[str, Dims], dict[str, int]]:
    """(input shapes, tensor addresses) of one step: `cached` positions in copy `side`, `new` positions in.
    Steps are a prefill (cached == 0) or one decoded position, as the decoder's two profiles are."""
    if cached and new != 1:
        raise ValueError(f"{new} new positions after {cached} cached: only prefill or single-position decode")
    shapes: dict[str, Dims] = {"inputs_embeds": (1, new, hidden), "attention_mask": (1, cached + new),
                               "position_ids": (1, new)}
    positions = buffers.position_table + cached * ALIGNMENT if cached else buffers.positions  # [n] or arange[:S]
    addresses = {"inputs_embeds": buffers.embeds, "attention_mask": buffers.mask, "logits": buffers.logits,
                 "position_ids": positions}
    for layer in range(layout.num_layers):
        for k, kind in enumerate(KINDS):
            shapes[f"past_key_values.{layer}.{kind}"] = layout.shape(cached)
            past, present = layout.addresses(buffers.kv, layer, k, cached, side)
            addresses[f"past_key_values.{layer}.{kind}"], addresses[f"present.{layer}.{kind}"] = past, present
    return shapes, addresses
