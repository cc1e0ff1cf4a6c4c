"""Decode roofline: weight bytes read per generated token and the machine's copy bandwidth.

At batch 1 a decode step is a matrix-vector product per weight matrix, so it must stream every weight it
uses from memory once: the attention and dense-FFN weights, the router, the K of E experts the token picked in
each MoE layer, one row of the embedding table and the whole lm_head. The vision tower and projector run
once per request and are not part of it. Ceiling: tokens/s <= bandwidth / bytes per token.

Bandwidth: a numpy copy of a buffer much larger than the last-level cache, counted as bytes moved (read +
written) per second, median of several copies, on 1 and on N threads (the backends run on N threads).
"""
from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np

ROUTER_ITEMSIZE = 4  # routers stay in fp32 in every precision
ITEMSIZE = {"fp32": 4, "fp16": 2}


@dataclass(frozen=True)
class DecodeBytes:
    """Weight bytes one decode token reads, by kind (plus the totals of the whole LM for reference)."""
    dense: int            # attention, norms, dense FFNs, routers
    experts_active: int   # K of E experts in every MoE layer
    embedding_row: int
    lm_head: int
    experts_total: int    # all E experts (what a dense-compute MoE would read)
    params_total: int     # LM parameters (embedding table and lm_head included)
    params_active: int    # parameters one decode token uses

    @property
    def total(self) -> int:
        return self.dense + self.experts_active + self.embedding_row + self.lm_head

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def decode_weight_bytes(config, itemsize: int = 4) -> DecodeBytes:
    """Count from the language model built on the meta device (no memory, no weights needed)."""
    import torch

    from moe_llava.backbones import backbone_for
    from moe_llava.moe import MoELayer
    with torch.device("meta"):
        lm = backbone_for(config).build(config)
    embed, head = lm.get_input_embeddings().weight, lm.get_output_embeddings().weight
    experts = {id(p): (m.top_k, m.num_experts) for m in lm.modules() if isinstance(m, MoELayer)
               for p in (m.fc1_weight, m.fc2_weight, m.fc1_bias, m.fc2_bias) if p is not None}
    routers = {id(m.router.weight) for m in lm.modules() if isinstance(m, MoELayer)}
    dense = active = total = 0
    params_total = params_active = 0
    for p in lm.parameters():  # shared (tied) parameters once
        n = p.numel()
        params_total += n
        if p is embed or p is head:
            continue
        if id(p) in experts:
            k, e = experts[id(p)]
            active += n // e * k * itemsize
            total += n * itemsize
            params_active += n // e * k
        else:
            dense += n * (ROUTER_ITEMSIZE if id(p) in routers else itemsize)
            params_active += n
    head_params = head.numel() + (lm.get_output_embeddings().bias.numel()
                                  if lm.get_output_embeddings().bias is not None else 0)
    params_active += head_params + embed.shape[1]
    return DecodeBytes(dense, active, embed.shape[1] * itemsize, head_params * itemsize, total, params_total,
                       params_active)


def copy_bandwidth_gbs(threads: int = 1, megabytes: int = 256, repeats: int = 7) -> float:
    """Median GB/s (read + written) of copying a `megabytes` buffer, split over `threads` threads."""
    n = megabytes * (1 << 20) // 4
    src = np.ones(n, np.float32)
    dst = np.zeros(n, np.float32)  # touched, so page faults are not timed
    bounds = np.linspace(0, n, threads + 1).astype(int)
    chunks = [(dst[a:b], src[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    times = []
    with ThreadPoolExecutor(threads) as pool:  # numpy releases the GIL while copying
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(lambda c: np.copyto(*c), chunks))
            times.append(time.perf_counter() - start)
    return 2 * src.nbytes / statistics.median(times) / 1e9


def gemv_read_gbs(megabytes: int = 256, repeats: int = 7) -> float:
    """Median GB/s read by numpy's BLAS matrix-vector product (the kernel decode is made of) on the same size:
    what a good GEMV achieves here, for context next to the copy roofline."""
    matrix = np.ones((megabytes * (1 << 20) // 4 // 4096, 4096), np.float32)
    vector = np.ones(4096, np.float32)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matrix @ vector
        times.append(time.perf_counter() - start)
    return matrix.nbytes / statistics.median(times) / 1e9


def measure_bandwidth(threads: int, megabytes: int = 256, repeats: int = 7) -> dict:
    """Copy bandwidth on 1 and on `threads` threads; `gbs` (the roofline's) is the better of the two."""
    one = copy_bandwidth_gbs(1, megabytes, repeats)
    many = copy_bandwidth_gbs(threads, megabytes, repeats) if threads > 1 else one
    return {"gbs": max(one, many), "copy_1_thread_gbs": one, f"copy_{threads}_threads_gbs": many,
            "gemv_read_gbs": gemv_read_gbs(megabytes, repeats)}


def median_bandwidth(samples: list[dict], megabytes: int = 256) -> dict:
    """Per-key medians of probes taken between measurement rounds (so the bandwidth drifts with the timings)."""
    out = {k: statistics.median(s[k] for s in samples) for k in samples[0]}
    out.update(probes=len(samples), buffer_mb=megabytes,
               method="numpy copyto of a buffer >> LLC, bytes read + written per second, probed between rounds")
    return out


def achieved(bytes_per_token: int, bandwidth_gbs: float, decode_tok_s: float) -> dict:
    """Ceiling tokens/s, achieved GB/s of weight traffic and % of the ceiling for one measured decode rate."""
    ceiling = bandwidth_gbs * 1e9 / bytes_per_token
    return {"bytes_per_token": bytes_per_token, "ceiling_tok_s": ceiling,
            "achieved_gbs": decode_tok_s * bytes_per_token / 1e9, "pct_of_roofline": 100 * decode_tok_s / ceiling}
