"""QMoE / GatherBlockQuantized layouts, checked numerically against onnxruntime's float ops.

The exact check: QMoE(codes, scales) == MoE(dequantize(codes, scales)) to float rounding - a wrong row order,
nibble order, scale shape or zero point would be off by the size of the weights, not by 1e-6.
"""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from calibration.blockwise import BlockQuant, dequantize, quantize
from calibration.embedding import quantize_embeddings
from calibration.qmoe import quantize_moe_experts

E, H, I, T, K = 4, 64, 96, 24, 2


def moe_model(activation: str, fc1, fc2, b1, b2) -> onnx.ModelProto:
    attrs = dict(k=K, activation_type=activation, normalize_routing_weights=1)
    if activation == "swiglu":
        attrs["swiglu_fusion"] = 1  # what export/moe_lowering.py emits for com.microsoft.MoE
    node = helper.make_node("MoE", ["x", "logits", "fc1", "b1", "fc2", "b2"], ["y"], name="/moe",
                            domain="com.microsoft", **attrs)
    graph = helper.make_graph(
        [node], "moe", [helper.make_tensor_value_info("x", 1, [None, H]),
                        helper.make_tensor_value_info("logits", 1, [None, E])],
        [helper.make_tensor_value_info("y", 1, [None, H])],
        [numpy_helper.from_array(a, n) for a, n in ((fc1, "fc1"), (b1, "b1"), (fc2, "fc2"), (b2, "b2"))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])


def run(model, **feeds):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def weights(activation: str, rng):
    f = 2 * I if activation == "swiglu" else I
    w = lambda *s: (rng.normal(size=s) * 0.1).astype(np.float32)  # noqa: E731
    return w(E, f, H), w(E, H, I), w(E, f), w(E, H)


def qmoe_vs_references(activation, bits, block_size, accuracy_level=0):
    """(max |QMoE - MoE(dequantised)|, max |QMoE - MoE(fp32)|, max |MoE(fp32)|, the QMoE node)."""
    rng = np.random.default_rng(0)
    fc1, fc2, b1, b2 = weights(activation, rng)
    x, logits = rng.normal(size=(T, H)).astype(np.float32), rng.normal(size=(T, E)).astype(np.float32)
    fp32 = run(moe_model(activation, fc1, fc2, b1, b2), x=x, logits=logits)
    model = moe_model(activation, fc1, fc2, b1, b2)
    assert quantize_moe_experts(model, bits, block_size, accuracy_level) == 1
    node = model.graph.node[0]
    spec = BlockQuant(bits, {a.name: helper.get_attribute_value(a) for a in node.attribute}.get("block_size"))
    deq = [dequantize(*quantize(w, spec), spec) for w in (fc1, fc2)]
    want = run(moe_model(activation, deq[0], deq[1], b1, b2), x=x, logits=logits)
    got = run(model, x=x, logits=logits)
    return np.abs(got - want).max(), np.abs(got - fp32).max(), np.abs(fp32).max(), node


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("bits,block_size", [(8, None), (4, 32), (4, None)])
def test_qmoe_layout_matches_fp32_moe(activation, bits, block_size):
    """fp32-activation kernels: QMoE == MoE(dequantised weights) up to float rounding."""
    layout_err, quant_err, scale, node = qmoe_vs_references(activation, bits, block_size)
    assert node.op_type == "QMoE" and {a.name: helper.get_attribute_value(a) for a in node.attribute}[
        "weights_prepacked"] == 0
    assert layout_err <= 1e-5 * scale                          # layout: exact up to float rounding
    assert quant_err <= (0.03 if bits == 8 else 0.35) * scale  # the quantisation error itself, vs fp32


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("bits,accuracy_level", [(8, 0), (4, 4)])
def test_qmoe_as_exported(activation, bits, accuracy_level):
    """The exports' settings (8 bit block-wise, 4 bit accuracy_level 4) quantise activations to int8 inside
    the kernel: a few % off MoE(dequantised); a layout error would be ~100 %."""
    layout_err, quant_err, scale, node = qmoe_vs_references(activation, bits, "auto", accuracy_level)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["block_size"] == 32   # H=64, I=96: 32 for 4 bit, and the largest block dividing both for 8
    assert layout_err <= 0.05 * scale
    assert quant_err <= (0.05 if bits == 8 else 0.35) * scale


def test_blockwise_roundtrip_and_packing():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(3, 8, 64)).astype(np.float32)
    for spec in (BlockQuant(8, None), BlockQuant(8, 32), BlockQuant(4, 16)):
        codes, scales = quantize(w, spec)
        assert codes.dtype == np.uint8 and codes.shape == (3, 8, 64 * spec.bits // 8)
        assert scales.shape == ((3, 8) if spec.block_size is None else (3, 8, 64 // spec.block_size))
        err = np.abs(dequantize(codes, scales, spec) - w).max()
        assert err <= np.abs(w).max() / 2 ** (spec.bits - 1) + 1e-6   # at most one step
    # [-1, 0]: scale 1/8, codes [-8, 0] + 8 = [0, 8]; element 0 goes to the low nibble
    codes, scales = quantize(np.array([[[-1.0, 0.0]]], np.float32), BlockQuant(4, None))
    assert codes[0, 0, 0] == 0x80 and scales[0, 0] == np.float32(0.125)


@pytest.mark.parametrize("bits", [8, 4])
def test_gather_block_quantized_embedding(bits):
    rng = np.random.default_rng(2)
    table = rng.normal(size=(50, 64)).astype(np.float32)
    node = helper.make_node("Gather", ["table", "ids"], ["out"], name="/embed")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [1, None])],
                              [helper.make_tensor_value_info("out", 1, [1, None, 64])],
                              [numpy_helper.from_array(table, "table")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert quantize_embeddings(model, bits) == 1
    assert model.graph.node[0].op_type == "GatherBlockQuantized"
    ids = np.array([[0, 7, 49, 7]], np.int64)
    got = run(model, ids=ids)
    spec = BlockQuant(bits, 32 if bits == 4 else 64)
    want = dequantize(*quantize(table, spec), spec)[ids]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
