"""INT4 weight-only graphs for TensorRT (export/trt_int4.py) on a small hand-built fp16 graph: what gets
quantised how, and - run in onnxruntime through the validation swap - that the INT4 graph computes the float
graph on the dequantised weights (blockwise.py's quantiser is the reference of the layout)."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from calibration.blockwise import BlockQuant, dequantize, quantize
from export.plugin_swap import swap_plugin_nodes
from calibration.trt_int4 import group_for, qmoe_twin, quantize_for_tensorrt

E, H, I, HEAD = 4, 64, 32, 48


def weights(activation: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    f = 2 * I if activation == 0 else I
    w = lambda *s: (rng.normal(size=s) / np.sqrt(s[-2] if len(s) == 2 else s[-1])).astype(np.float16)  # noqa: E731
    return {"router": rng.normal(size=(H, E)).astype(np.float32), "dense": w(H, H), "head": w(H, HEAD),
            "fc1": w(E, f, H), "fc1_b": (0.1 * rng.normal(size=(E, f))).astype(np.float16),
            "fc2": w(E, H, I), "fc2_b": (0.1 * rng.normal(size=(E, H))).astype(np.float16)}


def graph(ws: dict[str, np.ndarray], activation: int) -> onnx.ModelProto:
    """x -> fp32 router -> plugin MoE(x); z = moe + x @ dense; out = z @ head (the LM head)."""
    nodes = [
        helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT, name="/cast"),
        helper.make_node("MatMul", ["xf", "router"], ["logits"], name="/router"),
        helper.make_node("MoELlavaMoE", ["x", "logits", "fc1", "fc1_b", "fc2", "fc2_b"], ["moe"], name="/moe",
                         domain="moe_llava", num_experts=E, top_k=2, activation=activation,
                         normalize_routing_weights=1, plugin_version="1", plugin_namespace="moe_llava"),
        helper.make_node("MatMul", ["x", "dense"], ["d"], name="/dense"),
        helper.make_node("Add", ["moe", "d"], ["z"], name="/add"),
        helper.make_node("MatMul", ["z", "head"], ["out"], name="/head"),
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [None, H])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT16, [None, HEAD])],
                          [numpy_helper.from_array(a, n) for n, a in ws.items()])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("moe_llava", 1)])
    model.ir_version = 9
    return model


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    model = onnx.ModelProto.FromString(model.SerializeToString())
    swap_plugin_nodes(model, qmoe_twin)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def dequantised(ws: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The weights the INT4 graph means: experts group 32 (H=64, I=32), dense [K,N] blocks of 64 along K,
    the head INT8 per output column."""
    out = dict(ws)
    for name in ("fc1", "fc2"):
        spec = BlockQuant(4, 32)
        out[name] = dequantize(*quantize(ws[name], spec), spec).astype(np.float16)
    for name, spec in (("dense", BlockQuant(4, 64)), ("head", BlockQuant(8, None))):
        out[name] = dequantize(*quantize(ws[name].T.copy(), spec), spec).T.astype(np.float16)
    return out


def test_what_is_quantised_how():
    model = graph(weights(0), 0)
    report = quantize_for_tensorrt(model)
    assert report.to_dict() == {"int4_moe_nodes": 1, "int4_matmuls": 1, "int8_heads": 1, "float_routers": 1,
                                "float_matmuls": 0}
    inits = {t.name: t for t in model.graph.initializer}
    by_name = {n.name: n for n in model.graph.node}
    assert by_name["/router"].input[1] == "router" and inits["router"].data_type == TensorProto.FLOAT
    moe = by_name["/moe"]
    attrs = {a.name: helper.get_attribute_value(a) for a in moe.attribute}
    assert attrs["weight_bits"] == 4 and attrs["group_size"] == 32 and len(moe.input) == 8
    assert list(inits[moe.input[2]].dims) == [E, 2 * I, H // 8] and inits[moe.input[2]].data_type == TensorProto.INT32
    assert list(inits[moe.input[6]].dims) == [E, 2 * I, H // 32]
    assert inits[moe.input[7]].data_type == TensorProto.FLOAT16
    dq = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    dense, head = dq[by_name["/dense"].input[1]], dq[by_name["/head"].input[1]]
    assert {a.name: helper.get_attribute_value(a) for a in dense.attribute} == {"axis": 0, "block_size": 64}
    assert inits[dense.input[0]].data_type == TensorProto.INT4 and list(inits[dense.input[1]].dims) == [1, H]
    assert {a.name: helper.get_attribute_value(a) for a in head.attribute} == {"axis": 1}
    assert inits[head.input[0]].data_type == TensorProto.INT8 and list(inits[head.input[1]].dims) == [HEAD]
    assert next(o.version for o in model.opset_import if o.domain == "") == 21
    assert not {"dense", "head", "fc1", "fc2"} & set(inits)  # the float weights are gone


@pytest.mark.parametrize("activation", [0, 1])  # swiglu (rows interleaved for onnxruntime), gelu_tanh
def test_int4_graph_computes_the_dequantised_float_graph(activation):
    """A wrong nibble order, transpose, scale row or SwiGLU interleave moves the output by ~100% of its scale;
    fp16 kernels (QMoE vs MoE, DequantizeLinear vs an fp16 initializer) agree to ~1e-3 of it."""
    ws = weights(activation, seed=activation)
    x = np.random.default_rng(9).normal(size=(7, H)).astype(np.float16)
    quantized = graph(ws, activation)
    quantize_for_tensorrt(quantized)
    got = run(quantized, x).astype(np.float64)
    want = run(graph(dequantised(ws), activation), x).astype(np.float64)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 1e-2 * scale
    original = run(graph(ws, activation), x).astype(np.float64)
    assert np.abs(original - want).max() > 3e-2 * scale  # the quantisation is real: the check above can fail


def test_group_prefers_128():
    assert group_for(2048, 5632) == 128 and group_for(2560, 10240) == 128
    assert group_for(64, 96) == 32 and group_for(64) == 64 and group_for(48) is None


def test_experts_no_group_divides_are_refused():
    from calibration.trt_int4 import quantize_plugin_experts
    from runtime.errors import UserError
    model = graph(weights(1), 1)
    inits = {t.name: t for t in model.graph.initializer}
    inits["fc2"].CopyFrom(numpy_helper.from_array(np.zeros((E, H, 40), np.float16), "fc2"))  # I = 40
    with pytest.raises(UserError, match=r"expert width \(40\) to be multiples of 32.*--precision fp16"):
        quantize_plugin_experts(model)
