"""Validate `--moe-impl plugin` graphs without TensorRT: swap each plugin node for an equivalent op.

`moe_llava.MoELlavaMoE` and `com.microsoft.MoE` compute the same function (see moe_lowering.py); only the
SwiGLU row layout of fc1 differs ([gate; up] for the plugin, interleaved for onnxruntime). A plugin node with
INT4 experts (weight_bits=4) becomes `com.microsoft.QMoE` reading the same codes and scales (the plugin's int32
words viewed as QMoE's uint8 bytes: one layout, calibration/blockwise.py). The swapped graph is what validation
runs; the exported graph keeps the plugin nodes.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from calibration.blockwise import BlockQuant
from calibration.qmoe import qmoe_node

from .moe_lowering import PLUGIN_ACTIVATION, PLUGIN_OP

_ACTIVATION_NAMES = {v: k for k, v in PLUGIN_ACTIVATION.items()}


def swap_plugin_nodes(model: onnx.ModelProto) -> int:
    """In place: every MoELlavaMoE node becomes com.microsoft.MoE; returns how many were swapped."""
    initializers = {t.name: t for t in model.graph.initializer}
    swapped = 0
    for index, node in enumerate(model.graph.node):
        if node.op_type != PLUGIN_OP:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        activation = _ACTIVATION_NAMES[attrs["activation"]]
        inputs = list(node.input)
        gated = activation.value == "swiglu"
        int4 = attrs.get("weight_bits", 16) == 4
        if gated:  # the float weights, or the INT4 codes and scales: rows are rows either way
            for slot in (2, 3, 6) if int4 else (2, 3):  # fc1 weight (codes), bias, scales
                inputs[slot] = _interleaved_copy(model, initializers[inputs[slot]])
        elif activation.value != "gelu_tanh":
            raise ValueError(f"no onnxruntime equivalent for plugin activation {activation.value}")
        cast = helper.make_node("CastLike", [inputs[1], inputs[0]], [node.name + "/logits_cast"],
                                name=node.name + "/logits_cast")
        extra = {"swiglu_fusion": 1} if activation.value == "swiglu" else {}
        moe = helper.make_node("MoE", [inputs[0], cast.output[0]] + inputs[2:], list(node.output),
                               name=node.name + "/ort", domain="com.microsoft", k=attrs["top_k"],
                               activation_type="swiglu" if extra else "gelu",
                               normalize_routing_weights=attrs["normalize_routing_weights"], **extra)
        if int4:
            moe = _qmoe(model, moe, inputs, attrs["group_size"])
        model.graph.node.remove(node)
        model.graph.node.insert(index, moe)
        model.graph.node.insert(index, cast)
        swapped += 1
    if swapped and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return swapped


def _qmoe(model: onnx.ModelProto, moe: onnx.NodeProto, inputs: list[str], group: int) -> onnx.NodeProto:
    """The QMoE twin of an INT4 plugin node (`moe`: its com.microsoft.MoE form, `inputs`: the plugin's, SwiGLU
    rows already interleaved): codes as uint8 [E,N,K/2] - the same bytes - and the fp16 scales."""
    inits = {t.name: t for t in model.graph.initializer}
    names = {"fc1_scales": inputs[6], "fc2_scales": inputs[7]}
    for key, slot in (("fc1", 2), ("fc2", 4)):
        names[key] = inputs[slot] + "/uint8"
        codes = numpy_helper.to_array(inits[inputs[slot]])
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(codes).view(np.uint8),
                                                               names[key]))
    return qmoe_node(moe, names, BlockQuant(4, group))


def _interleaved_copy(model: onnx.ModelProto, tensor: onnx.TensorProto) -> str:
    """[E, 2I, ...] as [gate; up] -> a new initializer with rows interleaved (ORT's swiglu_fusion=1)."""
    array = numpy_helper.to_array(tensor)
    gate, up = np.split(array, 2, axis=1)
    interleaved = np.stack([gate, up], axis=2).reshape(array.shape)
    name = tensor.name + "/interleaved"
    model.graph.initializer.append(numpy_helper.from_array(interleaved, name))
    return name


def ort_equivalent_dir(export_dir: Path, target: Path) -> Path:
    """A copy of `export_dir` whose decoder.onnx has the plugin nodes swapped (weights inlined)."""
    target.mkdir(parents=True, exist_ok=True)
    for path in export_dir.iterdir():
        if path.is_file() and not path.name.startswith("decoder.onnx"):
            shutil.copy(path, target / path.name)
    model = onnx.load(str(export_dir / "decoder.onnx"))  # loads external data too
    swap_plugin_nodes(model)
    onnx.save(model, str(target / "decoder.onnx"), save_as_external_data=model.ByteSize() > (1 << 30),
              location="decoder.onnx.data")
    return target
