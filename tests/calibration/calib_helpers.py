"""Helpers of the calibration tests: the small synthetic set, and hand-built graphs with the shapes of an
exported MoE layer (tiny, so quantisers run in a second).

    [x3 [B,T,H] -> Reshape ->] x [T,H] -> LayerNormalization -> h      (batched: ModelOpt splits feeds on B)
    h -> Gemm(router, transB) -> logits -> Softmax -> TopK            ("portable" routing)
                                        -> com.microsoft.MoE(h, logits, fc1, ., fc2, .)   (ort=True)
    h -> MatMul(w1) -> Relu -> MatMul(w2) -> + x -> y                 (a dense FFN with weights)
"""
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from calibration.data import SyntheticSpec

SMALL_SET = SyntheticSpec(seed=0, n_train=24, n_heldout=4)
H, E, I, T = 32, 4, 64, 16
ROUTER = "/layers.0/mlp/router/Gemm"


def moe_layer_graph(ort: bool = False, batched: bool = False, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w = lambda *s: numpy_helper.from_array((rng.normal(size=s) * 0.2).astype(np.float32))  # noqa: E731
    inits = {"ln_w": np.ones(H, np.float32), "ln_b": np.zeros(H, np.float32), "router_w": w(E, H), "w1": w(H, I),
             "w2": w(I, H), "k": np.array([2], np.int64)}
    nodes = [helper.make_node("LayerNormalization", ["x", "ln_w", "ln_b"], ["h"], name="/ln", axis=-1),
             helper.make_node("Gemm", ["h", "router_w"], ["logits"], name=ROUTER, transB=1),
             helper.make_node("Softmax", ["logits"], ["probs"], name="/router/Softmax", axis=-1),
             helper.make_node("TopK", ["probs", "k"], ["top_w", "top_e"], name="/router/TopK", axis=-1),
             helper.make_node("MatMul", ["h", "w1"], ["a"], name="/ffn/fc1"),
             helper.make_node("Relu", ["a"], ["r"], name="/ffn/relu"),
             helper.make_node("MatMul", ["r", "w2"], ["f"], name="/ffn/fc2"),
             helper.make_node("Add", ["f", "x"], ["y"], name="/residual")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", H]),
               helper.make_tensor_value_info("top_e", TensorProto.INT64, ["T", 2])]
    if ort:
        inits.update(fc1=w(E, I, H), fc2=w(E, H, I))
        nodes.append(helper.make_node("MoE", ["h", "logits", "fc1", "", "fc2", ""], ["m"], name="/moe",
                                      domain="com.microsoft", k=2, activation_type="gelu", normalize_routing_weights=1))
        outputs.append(helper.make_tensor_value_info("m", TensorProto.FLOAT, ["T", H]))
    graph_input = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", H])
    if batched:
        inits["flat"] = np.array([-1, H], np.int64)
        nodes.insert(0, helper.make_node("Reshape", ["x3", "flat"], ["x"], name="/flatten"))
        graph_input = helper.make_tensor_value_info("x3", TensorProto.FLOAT, ["B", "T", H])
    tensors = [v if isinstance(v, onnx.TensorProto) else numpy_helper.from_array(v) for v in inits.values()]
    for name, t in zip(inits, tensors):
        t.name = name
    graph = helper.make_graph(nodes, "moe_layer", [graph_input], outputs, tensors)
    opsets = [helper.make_opsetid("", 18)] + ([helper.make_opsetid("com.microsoft", 1)] if ort else [])
    return helper.make_model(graph, opset_imports=opsets)


def feeds(n: int = 8, seed: int = 1, batched: bool = False) -> list[dict]:
    rng = np.random.default_rng(seed)
    if batched:
        return [{"x3": rng.normal(size=(1, T, H)).astype(np.float32)} for _ in range(n)]
    return [{"x": rng.normal(size=(T, H)).astype(np.float32)} for _ in range(n)]
