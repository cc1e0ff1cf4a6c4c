"""The stand-in ONNX parser refuses what TensorRT's parser refuses, and the graphs we emit for --target tensorrt
get past it: `--moe-impl portable` (no ScatterND reduction) and plugin nodes only once their creator is
registered, under the namespace the node names."""
from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

import fake_trt
from export.moe_lowering import (PLUGIN_DOMAIN, PLUGIN_OP, MoEImpl, drop_scatter_reduction, swap_in_export_moe,
                                 translation_table)
from moe_llava.moe import Activation, MoELayer


def parse(path, load_plugin: bool = True):
    trt = fake_trt.make_tensorrt(fake_trt.FakeCudart())
    if load_plugin:
        trt.get_plugin_registry().load_library("libmoe_llava_plugin.so")
    network = fake_trt.Network(0)
    parser = trt.OnnxParser(network, None)
    ok = parser.parse_from_file(str(path))
    return ok, [parser.get_error(i).desc() for i in range(parser.num_errors)], network


def one_node_model(tmp_path, node, opsets=(("", 18),)):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])
    extra = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4, 8]) for n in node.input[1:]]
    graph = helper.make_graph([node], "g", [x, *extra], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    path = tmp_path / f"{node.op_type}.onnx"
    onnx.save(model, path)
    return path


def plugin_node(**attrs):
    return helper.make_node(PLUGIN_OP, ["x"], ["y"], domain=PLUGIN_DOMAIN, name="/moe", **attrs)


def test_scatternd_with_reduction_is_refused(tmp_path):
    idx = helper.make_node("Constant", [], ["i"], value=helper.make_tensor("v", TensorProto.INT64, [1, 1], [0]))
    for reduction, want in (("add", False), (None, True)):
        extra = {"reduction": reduction} if reduction else {}
        node = helper.make_node("ScatterND", ["x", "i", "u"], ["y"], **extra)
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])
        u = helper.make_tensor_value_info("u", TensorProto.FLOAT, [1, 8])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])
        path = tmp_path / f"scatter-{reduction}.onnx"
        onnx.save(helper.make_model(helper.make_graph([idx, node], "g", [x, u], [y])), path)
        ok, errors, _ = parse(path)
        assert ok is want and (want or errors == ["Attribute reduction is not supported."])


def test_unknown_domains_and_unregistered_or_misplaced_plugins_are_refused(tmp_path):
    ort_moe = one_node_model(tmp_path, helper.make_node("MoE", ["x"], ["y"], domain="com.microsoft"),
                             (("", 18), ("com.microsoft", 1)))
    assert not parse(ort_moe)[0]
    good = one_node_model(tmp_path, plugin_node(plugin_version="1", plugin_namespace="moe_llava"),
                          (("", 18), (PLUGIN_DOMAIN, 1)))
    ok, _, network = parse(good)
    assert ok and network.plugins == {(PLUGIN_OP, "1", "moe_llava")}
    assert not parse(good, load_plugin=False)[0]  # creator not registered: the library was never loaded
    for attrs in ({"plugin_namespace": "other"}, {"plugin_namespace": ""}, {"plugin_version": "2"}):
        path = one_node_model(tmp_path, plugin_node(**attrs), (("", 18), (PLUGIN_DOMAIN, 1)))
        ok, errors, _ = parse(path)
        assert not ok and "not found" in errors[0], attrs
    fallback = one_node_model(tmp_path, plugin_node(), (("", 18), (PLUGIN_DOMAIN, 1)))
    assert parse(fallback)[0]  # no plugin_namespace attribute: "" then the node's domain


class OneMoE(torch.nn.Module):
    def __init__(self, moe):
        super().__init__()
        self.moe = moe

    def forward(self, x):
        return self.moe(x)


def test_portable_moe_parses_for_tensorrt_and_matches_pytorch(tmp_path):
    """The portable lowering's per-expert gather-add-scatter equals PyTorch's MoE layer (every token goes to
    K = 2 distinct experts of 4; T = 9 tokens so experts get several rows) and has no ScatterND reduction."""
    torch.manual_seed(0)
    moe = MoELayer(16, 24, num_experts=4, top_k=2, activation=Activation.SWIGLU, bias=False).eval()
    x = torch.randn(1, 9, 16)
    with torch.no_grad():
        want = moe(x).numpy()
    module = OneMoE(moe)
    swap_in_export_moe(module, MoEImpl.PORTABLE)
    path = tmp_path / "moe.onnx"
    tokens = torch.export.Dim("tokens")
    with torch.no_grad():
        program = torch.onnx.export(module.eval(), (x,), dynamo=True, opset_version=18, input_names=["x"],
                                    output_names=["y"], dynamic_shapes=({1: tokens},), verbose=False,
                                    custom_translation_table=translation_table(MoEImpl.PORTABLE))
    drop_scatter_reduction(program.model)  # as export/onnx_export.py does
    program.save(str(path))
    scatters = [n for n in onnx.load(str(path)).graph.node if n.op_type == "ScatterND"]
    assert len(scatters) == 4 and all(not n.attribute for n in scatters)
    ok, errors, _ = parse(path, load_plugin=False)
    assert ok, errors
    import onnxruntime as ort
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
