"""Validate `--moe-impl plugin` graphs without TensorRT: swap each plugin node for an equivalent op.

`moe_llava.MoELlavaMoE` and `com.microsoft.MoE` compute the same function (see moe_lowering.py); only the
SwiGLU row layout of fc1 differs ([gate; up] for the plugin, interleaved for onnxruntime). A plugin node with
INT4 experts (weight_bits=4) becomes `com.microsoft.QMoE` reading the same codes and scales, built by the
calibration layer that owns the INT4 format (`int4_node`, calibration.trt_int4.qmoe_twin). The swapped graph is
what validation runs; the exported graph keeps the plugin nodes.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from runtime.errors import UserError

from .moe_lowering import PLUGIN_ACTIVATION, PLUGIN_OP

_ACTIVATION_NAMES = {v: k for k, v in PLUGIN_ACTIVATION.items()}


Int4Twin = Callable[[onnx.ModelProto, onnx.NodeProto, list, int], onnx.NodeProto]


def swap_plugin_nodes(model: onnx.ModelProto, int4_node: Int4Twin | None = None) -> int:
    """In place: every MoELlavaMoE node becomes com.microsoft.MoE (INT4 ones: `int4_node`'s QMoE); returns how
    many were swapped."""
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
            if int4_node is None:
                raise UserError("INT4 plugin nodes are validated by the calibration layer "
                                "(calibration.trt_int4.qmoe_twin)")
            moe = int4_node(model, moe, inputs, attrs["group_size"])
        model.graph.node.remove(node)
        model.graph.node.insert(index, moe)
        model.graph.node.insert(index, cast)
        swapped += 1
    if swapped and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return swapped


def _interleaved_copy(model: onnx.ModelProto, tensor: onnx.TensorProto) -> str:
    """[E, 2I, ...] as [gate; up] -> a new initializer with rows interleaved (ORT's swiglu_fusion=1)."""
    array = numpy_helper.to_array(tensor)
    gate, up = np.split(array, 2, axis=1)
    interleaved = np.stack([gate, up], axis=2).reshape(array.shape)
    name = tensor.name + "/interleaved"
    model.graph.initializer.append(numpy_helper.from_array(interleaved, name))
    return name


def ort_equivalent_dir(export_dir: Path, target: Path, int4_node: Int4Twin | None = None) -> Path:
    """A copy of `export_dir` whose decoder.onnx has the plugin nodes swapped (weights inlined)."""
    target.mkdir(parents=True, exist_ok=True)
    for path in export_dir.iterdir():
        if path.is_file() and not path.name.startswith("decoder.onnx"):
            shutil.copy(path, target / path.name)
    model = onnx.load(str(export_dir / "decoder.onnx"))  # loads external data too
    swap_plugin_nodes(model, int4_node)
    onnx.save(model, str(target / "decoder.onnx"), save_as_external_data=model.ByteSize() > (1 << 30),
              location="decoder.onnx.data")
    return target
