"""Weight-only graphs keep routers, norms and softmax in float; the graph passes keep the numbers."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from calibration.graph import fold_constant_weights, gemm_to_matmul, producers, qdq_fed_inputs, router_nodes
from calibration.weight_only import PLANS, quantize_weight_only
from calib_helpers import ROUTER, feeds, moe_layer_graph


def outputs(path_or_model, feed):
    model = path_or_model if isinstance(path_or_model, onnx.ModelProto) else onnx.load(str(path_or_model))
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)


def node(model, name):
    return next(n for n in model.graph.node if n.name == name)


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_weight_only_quantises_every_matmul_but_the_router(tmp_path, precision):
    src, dst = tmp_path / "f.onnx", tmp_path / "q.onnx"
    onnx.save(moe_layer_graph(ort=True), str(src))
    report = quantize_weight_only(src, dst, PLANS[precision])
    q = onnx.load(str(dst))
    ops = [n.op_type for n in q.graph.node]
    assert ops.count("MatMulNBits") == 2 and "QMoE" in ops and "QuantizeLinear" not in ops
    assert node(q, ROUTER).op_type == "Gemm" and report.quantized_nodes == 2 and report.moe_nodes == 1
    bits = int(precision[3:])
    for n in q.graph.node:   # every quantised op on onnxruntime's fast CPU path (int8 activations inside)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        if n.op_type == "MatMulNBits":
            assert attrs["bits"] == bits and attrs["accuracy_level"] == 4
        if n.op_type == "QMoE":
            assert attrs["expert_weight_bits"] == bits and attrs["accuracy_level"] == 4
    x = feeds(1, seed=5)[0]
    want, got = outputs(src, x), outputs(dst, x)
    np.testing.assert_array_equal(got[1], want[1])                        # float routing: same experts
    # round-to-nearest error of one weight: half a step of a (2^(bits-1))-level block scale, summed over K
    limit = {"int8": 0.02, "int4": 0.15}[precision]
    assert np.abs(got[0] - want[0]).max() <= limit * np.abs(want[0]).max()
    assert np.abs(got[2] - want[2]).max() <= limit * np.abs(want[2]).max()


def test_fold_and_gemm_rewrite_keep_the_numbers():
    model = moe_layer_graph()
    # a portable-lowering style expert weight: Transpose(Gather(stack, e)) feeding a MatMul
    stack = np.random.default_rng(3).normal(size=(3, 64, 32)).astype(np.float32)      # [E,I,H]
    model.graph.initializer.extend([numpy_helper.from_array(stack, "stack"),
                                    numpy_helper.from_array(np.array(1, np.int64), "e")])
    w1 = next(i for i in model.graph.initializer if i.name == "w1")
    model.graph.initializer.remove(w1)
    model.graph.node.insert(0, onnx.helper.make_node("Gather", ["stack", "e"], ["g"], name="/gather"))
    model.graph.node.insert(1, onnx.helper.make_node("Transpose", ["g"], ["w1"], name="/transpose", perm=[1, 0]))
    x = feeds(1)[0]
    before = outputs(model, x)
    assert fold_constant_weights(model) == 2
    assert "stack" not in {i.name for i in model.graph.initializer}
    assert gemm_to_matmul(model, skip=set()) == 1 and producers(model)["logits"].op_type == "MatMul"
    after = outputs(model, x)
    np.testing.assert_allclose(after[0], before[0], atol=1e-5)
    np.testing.assert_array_equal(after[1], before[1])


def head_graph(k: int = 64, n: int = 128) -> onnx.ModelProto:
    """x -> MatMul (a dense weight) -> Relu -> MatMul (the LM head: its output is the graph output)."""
    rng = np.random.default_rng(7)
    weights = [numpy_helper.from_array((rng.normal(size=s) * 0.2).astype(np.float32), name)
               for name, s in (("w_dense", (k, k)), ("w_head", (k, n)))]
    nodes = [onnx.helper.make_node("MatMul", ["x", "w_dense"], ["h"], name="/dense"),
             onnx.helper.make_node("Relu", ["h"], ["r"], name="/relu"),
             onnx.helper.make_node("MatMul", ["r", "w_head"], ["logits"], name="/head")]
    graph = onnx.helper.make_graph(nodes, "head", [onnx.helper.make_tensor_value_info("x", 1, ["T", k])],
                                   [onnx.helper.make_tensor_value_info("logits", 1, ["T", n])], weights)
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_the_lm_head_gets_its_own_setting(tmp_path, precision):
    # found by reaching the graph output, not by name: int8 dense block 32 / head block 128, int4 dense 4 bit
    src, dst = tmp_path / "f.onnx", tmp_path / "q.onnx"
    onnx.save(head_graph(), str(src))
    plan = PLANS[precision]
    quantize_weight_only(src, dst, plan)
    q = onnx.load(str(dst))
    made = producers(q)
    for tensor, spec in (("h", plan.dense), ("logits", plan.head)):
        assert made[tensor].op_type == "MatMulNBits"
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in made[tensor].attribute}
        assert (attrs["bits"], attrs["block_size"], attrs["accuracy_level"]) == \
            (spec.bits, spec.block_size, spec.accuracy_level)
    x = {"x": np.random.default_rng(8).normal(size=(4, 64)).astype(np.float32)}
    want, got = outputs(src, x)[0], outputs(dst, x)[0]
    assert np.abs(got - want).max() <= {"int8": 0.02, "int4": 0.15}[precision] * np.abs(want).max()
