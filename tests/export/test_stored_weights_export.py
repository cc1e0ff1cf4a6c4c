"""The quantised exports trace a model that keeps the checkpoint's 16-bit weights and computes in fp32
(moe_llava/upcast.py): its graphs must compute what the fp32 load's graphs compute, bit for bit."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from export.moe_lowering import MoEImpl
from export.onnx_export import write_export
from export.precision import Precision
from moe_llava import upcast
from moe_llava.loading import load_pretrained, save_pretrained
from tiny import write_tiny_checkpoint


def feeds(session: ort.InferenceSession, rng) -> dict:
    out = {}
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) else 3 for d in i.shape]
        if i.name.startswith("past_key_values"):
            shape[2] = 0
        if i.type == "tensor(int64)":
            out[i.name] = np.arange(3)[None] if i.name == "position_ids" else \
                np.ones(shape, np.int64) if i.name == "attention_mask" else rng.integers(0, 50, shape)
        else:
            out[i.name] = rng.normal(size=shape).astype(np.float32)
    return out


def test_graphs_traced_from_16_bit_storage_equal_the_fp32_graphs(tmp_path, monkeypatch):
    # experts [4, 320, 64] and the 384-word tables pass onnxscript's constant-folding size limit: they stay
    # fp16 initializers behind a Cast, as at the released size. The LM head and the embedding table compute
    # in row blocks when run eagerly (upcast.LARGE_BYTES, the released model's path): traced, each stays one
    # product.
    monkeypatch.setattr(upcast, "LARGE_BYTES", 32 << 10)
    write_tiny_checkpoint(tmp_path, "stablelm", seed=3, intermediate_size=160)
    save_pretrained(load_pretrained(tmp_path, dtype="fp16").model, tmp_path / "half", tmp_path / "_tok")
    for name, keep in (("stored", True), ("plain", False)):
        (tmp_path / name).mkdir()
        loaded = load_pretrained(tmp_path / "half", dtype="fp32", keep_stored=keep)
        write_export(loaded, tmp_path / name, MoEImpl.ORT, Precision.FP32)
    decoder = onnx.load(str(tmp_path / "stored" / "decoder.onnx"))
    products = [sum(n.op_type in ("MatMul", "Gemm", "Gather") for n in onnx.load(str(tmp_path / d / f"{part}.onnx")).graph.node)
                for part in ("vision", "embed", "decoder") for d in ("stored", "plain")]
    assert products[0::2] == products[1::2], products
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in decoder.graph.initializer)
    assert sum(n.op_type == "Cast" for n in decoder.graph.node) >= 3
    rng = np.random.default_rng(0)
    for part in ("vision", "projector", "embed", "decoder"):
        stored, plain = (ort.InferenceSession(str(tmp_path / d / f"{part}.onnx"), providers=["CPUExecutionProvider"])
                         for d in ("stored", "plain"))
        feed = feeds(plain, rng)
        for got, want in zip(stored.run(None, feed), plain.run(None, feed)):
            np.testing.assert_array_equal(got, want)
