"""Roofline byte counting (active experts only) against a hand count, and the bandwidth probe."""
from __future__ import annotations

import pytest

from benchmarks.roofline import achieved, copy_bandwidth_gbs, decode_weight_bytes  # noqa: E402
from tiny import VOCAB, tiny_config  # noqa: E402


def hand_count(h: int, i: int, v: int, layers: int, moe_layers: int, e: int, k: int) -> dict:
    """Parameters of the tiny StableLM by hand: q/k/v with bias, o without, two LayerNorms (weight + bias) per
    layer, SwiGLU FFN (gate, up, down) dense or as E stacked experts behind an E x H router, final LayerNorm."""
    attention = 3 * (h * h + h) + h * h
    norms = 2 * 2 * h
    ffn = 3 * h * i
    dense_layers = layers - moe_layers
    dense = layers * (attention + norms) + dense_layers * ffn + moe_layers * e * h + 2 * h
    return {"dense": dense, "experts_active": moe_layers * k * ffn, "experts_total": moe_layers * e * ffn,
            "embedding_row": h, "lm_head": v * h}


def test_decode_bytes_equal_a_hand_count_with_active_experts_only():
    got = decode_weight_bytes(tiny_config("stablelm", num_experts=4, top_k=2), itemsize=4)
    want = hand_count(h=64, i=96, v=VOCAB, layers=4, moe_layers=2, e=4, k=2)
    assert got.dense == 4 * want["dense"]
    assert got.experts_active == 4 * want["experts_active"]
    assert got.experts_total == 4 * want["experts_total"]
    assert (got.embedding_row, got.lm_head) == (4 * want["embedding_row"], 4 * want["lm_head"])
    assert got.total == 4 * (want["dense"] + want["experts_active"] + want["embedding_row"] + want["lm_head"])
    assert got.params_total == want["dense"] + want["experts_total"] + 2 * VOCAB * 64


def test_more_experts_leave_the_bytes_per_token_unchanged_except_routers():
    four = decode_weight_bytes(tiny_config("stablelm", num_experts=4, top_k=2))
    sixteen = decode_weight_bytes(tiny_config("stablelm", num_experts=16, top_k=2))
    assert sixteen.experts_active == four.experts_active
    assert sixteen.experts_total == 4 * four.experts_total
    assert sixteen.dense - four.dense == 2 * 12 * 64 * 4  # two routers grew by 12 rows of H fp32


def test_fp16_halves_everything_but_the_fp32_routers():
    config = tiny_config("stablelm")
    fp32, fp16 = decode_weight_bytes(config, 4), decode_weight_bytes(config, 2)
    routers = 2 * 4 * 64 * 4
    assert fp16.dense - routers == (fp32.dense - routers) // 2
    assert fp16.experts_active * 2 == fp32.experts_active


def test_bandwidth_probe_and_ceiling():
    assert copy_bandwidth_gbs(threads=1, megabytes=8, repeats=3) > 0
    assert copy_bandwidth_gbs(threads=2, megabytes=8, repeats=3) > 0
    figures = achieved(bytes_per_token=10**9, bandwidth_gbs=20.0, decode_tok_s=10.0)
    assert figures["ceiling_tok_s"] == pytest.approx(20.0)
    assert figures["achieved_gbs"] == pytest.approx(10.0)
    assert figures["pct_of_roofline"] == pytest.approx(50.0)
