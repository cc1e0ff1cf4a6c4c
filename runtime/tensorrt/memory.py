"""Device-memory arithmetic shared by the TensorRT backend's allocations and the memory plan
(`moe-export --memory-plan`): one formula each, so the plan cannot drift from what the backend allocates.

Shapes: L layers, KVH kv heads, D head dim, M max positions, T tokens, E experts, K active experts,
H hidden, I expert FFN width.
"""
from __future__ import annotations

from enum import Enum

ALIGNMENT = 256  # bytes: what TensorRT requires of every tensor address (setTensorAddress); cudaMalloc gives it
KV_KINDS = 2  # key, value


class KVMode(str, Enum):
    """How the decoder engine's KV tensors sit in the device cache (export/tensorrt_kv_append.py):
    APPEND  one buffer: past [1,n,KVH,D] is its prefix, the engine writes the new positions after it;
    CONCAT  the contract graph's present = concat(past, new) [1,KVH,n+S,D] overlaps past with a shift when bound
            to one buffer, so it goes to a second copy and the two swap after each step."""
    APPEND = "append"
    CONCAT = "concat"

    @property
    def copies(self) -> int:
        return 1 if self is KVMode.APPEND else 2


def aligned(nbytes: int) -> int:
    return -(-int(nbytes) // ALIGNMENT) * ALIGNMENT


def kv_slot_bytes(num_kv_heads: int, head_dim: int, max_len: int, itemsize: int) -> int:
    """One (layer, key|value) buffer of M*KVH*D elements, padded so every slot starts aligned."""
    return aligned(num_kv_heads * max_len * head_dim * itemsize)


def kv_append_aligned(num_kv_heads: int, head_dim: int, itemsize: int) -> bool:
    """APPEND binds the new positions at byte offset n*KVH*D*itemsize: aligned for every n only if one position
    is a multiple of ALIGNMENT."""
    return (num_kv_heads * head_dim * itemsize) % ALIGNMENT == 0


def kv_mode_for(num_kv_heads: int, head_dim: int, itemsize: int) -> KVMode:
    """The layout a TensorRT build gives the decoder (when its graph has the contract's Concat pattern)."""
    return KVMode.APPEND if kv_append_aligned(num_kv_heads, head_dim, itemsize) else KVMode.CONCAT


def kv_cache_bytes(num_layers: int, num_kv_heads: int, head_dim: int, max_len: int, itemsize: int,
                   mode: KVMode) -> int:
    """The device KV cache: mode.copies x [L, 2, M*KVH*D]."""
    return mode.copies * num_layers * KV_KINDS * kv_slot_bytes(num_kv_heads, head_dim, max_len, itemsize)


def moe_workspace_bytes(tokens: int, experts: int, top_k: int, hidden: int, intermediate: int,
                        itemsize: int) -> int:
    """The MoE plugin's workspace for T tokens: the same regions, in the same order, each 256-byte aligned, as
    makeLayout in runtime/plugins/moe_kernels.cu (what getWorkspaceSize returns for the profile's max T).
    Slots S = T*K: top-k ids, weights, slot map and sorted tokens (4 bytes each), expert and tile offsets
    [E+1], active experts [E], their count, then the permuted rows [S,H] and the intermediate [S,I] in the
    compute type (fp16: 2 bytes, fp32: 4)."""
    slots = tokens * top_k
    regions = (slots * 4, slots * 4, slots * 4, slots * 4, (experts + 1) * 4, (experts + 1) * 4, experts * 4, 4,
               slots * hidden * itemsize, slots * intermediate * itemsize)
    return sum(aligned(r) for r in regions)
