"""Symmetric block-wise round-to-nearest weight quantisation, in the layout onnxruntime's weight-only ops read.

  weights  [..., N, K] float  ->  codes uint8 [..., N, K*bits/8]  (4 bit: element k in byte k//2, even k in
                                                                   the low nibble)
                                  scales      [..., N, K/block]   (or [..., N] with one block per row)
  dequantised = (code - 2^(bits-1)) * scale          (the ops' default zero point for uint8 codes)

Per block, the value of largest magnitude maps to -2^(bits-1), so the full signed range is used and the
other values round into [-2^(bits-1), 2^(bits-1) - 1]. Used by QMoE experts (qmoe.py) and
GatherBlockQuantized embedding tables (embedding.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BlockQuant:
    bits: int                 # 8 or 4
    block_size: int | None    # None: one scale per row (all of K); else a power of two >= 16 dividing K

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ValueError(f"block-wise quantisation supports 4 or 8 bits, not {self.bits}")
        if self.block_size is not None and (self.block_size < 16 or self.block_size & (self.block_size - 1)):
            raise ValueError(f"block_size must be a power of two >= 16, not {self.block_size}")


def block_for(widths, bits: int) -> int | None:
    """The block along K: 4 bit 32 (accuracy), 8 bit the largest power of two <= 128 dividing every width."""
    candidates = (32, 16) if bits == 4 else (128, 64, 32, 16)
    return next((b for b in candidates if all(w % b == 0 for w in widths)), None)


def quantize(weights: np.ndarray, spec: BlockQuant) -> tuple[np.ndarray, np.ndarray]:
    """[...,N,K] float -> (codes uint8 [...,N,K*bits/8], scales [...,N,K/block] or [...,N], weights' dtype).

    A K that the block does not divide is padded to whole blocks; the padding's codes are 0, as onnxruntime's
    MatMulNBits quantiser writes them (the kernel never reads them)."""
    *lead, k = weights.shape
    given = k
    block = spec.block_size or k
    if k % block:
        weights = np.concatenate([weights, np.zeros((*lead, block - k % block), weights.dtype)], -1)
        k = weights.shape[-1]
    w = weights.astype(np.float32).reshape(*lead, k // block, block)            # [...,N,B,blk]
    lo = -(1 << (spec.bits - 1))
    extreme = np.take_along_axis(w, np.abs(w).argmax(-1)[..., None], -1)       # signed largest magnitude
    scale = np.where(extreme == 0, 1.0, extreme / lo).astype(np.float32)       # [...,N,B,1]
    codes = (np.clip(np.rint(w / scale), lo, -lo - 1) - lo).astype(np.uint8).reshape(*lead, k)
    if spec.bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)                     # [...,N,K/2]
    codes[..., -(-given * spec.bits // 8):] = 0
    scales = scale[..., 0] if spec.block_size else scale[..., 0, 0]
    return np.ascontiguousarray(codes), scales.astype(weights.dtype)


def dequantize(codes: np.ndarray, scales: np.ndarray, spec: BlockQuant) -> np.ndarray:
    """Inverse of `quantize` (the reference the onnxruntime kernels are checked against) -> float32."""
    q = codes.astype(np.int16)
    if spec.bits == 4:
        q = np.stack([q & 0x0F, q >> 4], axis=-1).reshape(*q.shape[:-1], -1)   # [...,N,K]
    q = q - (1 << (spec.bits - 1))
    *lead, k = q.shape
    block = spec.block_size or k
    s = scales.astype(np.float32).reshape(*lead, -1, 1)                        # [...,N,B,1]
    return (q.reshape(*lead, k // block, block) * s).reshape(*lead, k)


CHUNK_BYTES = 64 << 20    # float read per step by quantize_chunked; its temporaries are a few times this


def quantize_chunked(read_rows, shape: tuple[int, ...], dtype, spec: BlockQuant, k_first: bool = False,
                     chunk_bytes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`quantize` of a tensor too large to hold in float, read `read_rows(start, stop)` along its leading axis.

    k_first False: the tensor is [..., N, K] (blocks along the last axis): == quantize(tensor).
    k_first True: a MatMul weight [K, N] (blocks along the leading axis): == quantize(tensor.T); each read
    spans whole blocks, so every block is quantised from one chunk.
    """
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
    rows = max(1, (chunk_bytes or CHUNK_BYTES) // max(row_bytes, 1))
    if not k_first:
        pieces = [quantize(read_rows(s, s + rows), spec) for s in range(0, shape[0], rows)]
        return (np.concatenate([p[0] for p in pieces]), np.concatenate([p[1] for p in pieces]))
    k, n = shape
    block = spec.block_size or k
    rows = block if spec.block_size is None else max(block, rows // block * block)
    blocks = -(-k // block)
    codes = np.empty((n, blocks * block * spec.bits // 8), np.uint8)
    scales = np.empty((n, blocks) if spec.block_size else (n,), dtype)
    for start in range(0, k, rows):
        stop = min(start + rows, k)
        c, s = quantize(read_rows(start, stop).T, spec)
        codes[:, start * spec.bits // 8: start * spec.bits // 8 + c.shape[1]] = c
        if spec.block_size:
            scales[:, start // block: start // block + s.shape[1]] = s
        else:
            scales[:] = s
    return codes, scales
