"""`--kv-cache int8`: GroupQueryAttention's quantised cache (onnxruntime CPU kernel) against a numpy reference,
the calibrated scales, and a fused export with an int8 cache through the runtime against its float twin."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper

from export.kv_cache_int8 import INT8_MAX, MARGIN, channel_scales
from export.onnx_export import export_onnx
from export.validate import KV_INT8_TOLERANCE
from runtime.ort_engine import HostDecoder, OrtDeviceDecoder, OrtEngine
from tiny import write_tiny_checkpoint

NH, KVH, D, M = 4, 2, 16, 32  # query heads, kv heads, head dim, cache buffer length


def _int8_cache_node_session() -> ort.InferenceSession:
    """One GroupQueryAttention node, packed fp32 qkv, an int8 cache with per-channel scales as inputs."""
    inputs = [helper.make_tensor_value_info("qkv", TP.FLOAT, [1, None, (NH + 2 * KVH) * D]),
              helper.make_tensor_value_info("past_key", TP.INT8, [1, KVH, M, D]),
              helper.make_tensor_value_info("past_value", TP.INT8, [1, KVH, M, D]),
              helper.make_tensor_value_info("seqlens_k", TP.INT32, [1]),
              helper.make_tensor_value_info("total", TP.INT32, []),
              helper.make_tensor_value_info("k_scale", TP.FLOAT, [1, KVH, 1, D]),
              helper.make_tensor_value_info("v_scale", TP.FLOAT, [1, KVH, 1, D])]
    outputs = [helper.make_tensor_value_info("out", TP.FLOAT, None),
               helper.make_tensor_value_info("present_key", TP.INT8, None),
               helper.make_tensor_value_info("present_value", TP.INT8, None)]
    node = helper.make_node("GroupQueryAttention",
                            ["qkv", "", "", "past_key", "past_value", "seqlens_k", "total"] + [""] * 5
                            + ["k_scale", "v_scale"], ["out", "present_key", "present_value"],
                            domain="com.microsoft", num_heads=NH, kv_num_heads=KVH, k_quant_type="PER_CHANNEL",
                            v_quant_type="PER_CHANNEL", kv_cache_bit_width=8)
    model = helper.make_model(helper.make_graph([node], "gqa_int8", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _reference(q, keys, values, cached: int) -> np.ndarray:
    """Causal GQA in numpy: q [S,NH,D], keys/values [KVH,T,D] (dequantised) -> [S,NH*D]."""
    s, t = q.shape[0], keys.shape[1]
    keys, values = (np.repeat(x, NH // KVH, axis=0) for x in (keys, values))        # [NH,T,D]
    scores = np.einsum("snd,ntd->nst", q, keys) / np.sqrt(D)                        # [NH,S,T]
    scores = scores + np.triu(np.full((s, t), -np.inf), k=cached + 1)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("nst,ntd->snd", probs, values).reshape(s, NH * D)


def test_int8_cache_stores_rounded_values_and_attends_over_them():
    """Prefill 5 then decode 1 into one shared int8 buffer: stored = clip(round(x / scale)), and the output is
    attention over stored * scale (float64 numpy), also for a key element far outside its scale (saturates)."""
    session, rng = _int8_cache_node_session(), np.random.default_rng(0)
    scales = {kind: rng.uniform(0.01, 0.03, (1, KVH, 1, D)).astype(np.float32) for kind in ("key", "value")}
    cache = {kind: np.zeros((1, KVH, M, D), np.int8) for kind in ("key", "value")}
    cached = 0
    for new in (5, 1):
        qkv = rng.standard_normal((1, new, (NH + 2 * KVH) * D)).astype(np.float32)
        qkv[0, 0, NH * D] = 100.0                                                   # saturates: 100 / 0.03 > 127
        total = cached + new
        binding, out = session.io_binding(), np.empty((1, new, NH * D), np.float32)
        for name, array in dict(qkv=qkv, past_key=cache["key"], past_value=cache["value"],
                                seqlens_k=np.array([total - 1], np.int32), total=np.array(total, np.int32),
                                k_scale=scales["key"], v_scale=scales["value"]).items():
            binding.bind_cpu_input(name, array)
        for name, array in (("out", out), ("present_key", cache["key"]), ("present_value", cache["value"])):
            binding.bind_output(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
        session.run_with_iobinding(binding)                                         # writes the cache in place
        q, k, v = np.split(qkv[0].astype(np.float64), [NH * D, (NH + KVH) * D], axis=-1)
        for kind, x in (("key", k), ("value", v)):
            want = np.clip(np.round(x.reshape(new, KVH, D).transpose(1, 0, 2) / scales[kind][0]), -128, 127)
            assert np.array_equal(cache[kind][0, :, cached:total], want)
        deq = {kind: cache[kind][0, :, :total] * scales[kind][0].astype(np.float64) for kind in cache}
        ref = _reference(q.reshape(new, NH, D), deq["key"], deq["value"], cached)
        assert np.abs(out[0] - ref).max() < 1e-5                                    # fp32 accumulation
        cached = total
    assert cache["key"][0, 0, 0, 0] == INT8_MAX


def test_rotary_pairs_share_a_scale_that_no_rotation_exceeds():
    """A key calibrated at one angle, rotated to any other (a later position), never saturates the cache."""
    rotary, rng = 8, np.random.default_rng(1)
    key = rng.standard_normal(D).astype(np.float32)                                 # one head's key
    absmax = np.abs(np.tile(key, (1, 2, 1, 1)))                                     # [L=1,2,KVH=1,D]
    scale = channel_scales(absmax, rotary)[0, 0, 0]
    half = rotary // 2
    assert np.allclose(scale[half:rotary], scale[:half])
    assert np.allclose(scale[rotary:], np.abs(key[rotary:]) * MARGIN / INT8_MAX)   # pass-through: its own |max|
    for angle in np.linspace(0, 2 * np.pi, 97):
        x1, x2 = key[:half], key[half:rotary]
        rotated = np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle), x1 * np.sin(angle) + x2 * np.cos(angle)])
        assert (np.abs(rotated / scale[:rotary]) <= INT8_MAX / MARGIN + 1e-3).all()


@pytest.mark.slow
def test_int8_cache_export_follows_its_float_twin(tmp_path):
    """Tiny StableLM with the rotary inside the op (D 64, R 16): the int8-cache export validates, says so in its
    manifest and graph, and the runtime's host and device decoders keep its logits close to the float export's."""
    checkpoint = tmp_path / "ckpt"
    write_tiny_checkpoint(checkpoint, "stablelm", hidden_size=128, num_attention_heads=2, num_key_value_heads=2)
    dirs = {kv: tmp_path / kv for kv in ("float", "int8")}
    export_onnx(checkpoint, dirs["float"], "ort", "fp32", validate=False)
    export_onnx(checkpoint, dirs["int8"], "ort", "fp32", kv_cache="int8")
    report = json.loads((dirs["int8"] / "validation.json").read_text())
    assert report["passed"] and report["kv_cache"] == "int8" and report["router_agreement"] >= 0.9
    manifest = json.loads((dirs["int8"] / "manifest.json").read_text())
    assert manifest["kv_cache"] == "int8"
    assert {t["dtype"] for t in manifest["parts"]["decoder"]["inputs"] if t["name"].startswith("past")} == {"int8"}
    nodes = [n for n in onnx.load(str(dirs["int8"] / "decoder.onnx")).graph.node if n.op_type == "GroupQueryAttention"]
    assert len(nodes) == 4 and all(len(n.input) == 14 for n in nodes)              # k_scale, v_scale at 12, 13
    rng = np.random.default_rng(0)
    with OrtEngine(dirs["float"]) as ref, OrtEngine(dirs["int8"]) as engine:
        assert isinstance(engine._decoder, HostDecoder) and engine._decoder.cache.dtype == np.int8
        embeds = ref.embed_tokens(rng.integers(1, 200, 9))
        want = [ref.prefill(embeds)] + [ref.decode(t) for t in (7, 11, 3)]
        for decoder in (engine._decoder, OrtDeviceDecoder(ort, engine.sessions["decoder"], engine.manifest, 64, "cpu")):
            engine._decoder = decoder
            got = [engine.prefill(embeds)] + [engine.decode(t) for t in (7, 11, 3)]
            for g, w in zip(got, want):
                assert np.abs(g - w).max() <= KV_INT8_TOLERANCE.atol + KV_INT8_TOLERANCE.rtol * np.abs(w).max()
                assert np.abs(g - w).max() > 0                                      # the cache is int8 indeed
