"""Validate `--moe-impl plugin` graphs without TensorRT: swap each plugin node for an equivalent op.

`moe_llava.MoELlavaMoE` and `com.microsoft.MoE` compute the same function (see moe_lowering.py); only the
SwiGLU row layout of fc1 differs ([gate; up] for the plugin, interleaved for onnxruntime). The swapped
graph is what validation runs; the exported graph keeps the plugin nodes.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

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
        if activation.value == "swiglu":
            inputs[2] = _interleaved_copy(model, initializers[inputs[2]])
            inputs[3] = _interleaved_copy(model, initializers[inputs[3]])
        elif activation.value != "gelu_tanh":
            raise ValueError(f"no onnxruntime equivalent for plugin activation {activation.value}")
        cast = helper.make_node("CastLike", [inputs[1], inputs[0]], [node.name + "/logits_cast"],
                                name=node.name + "/logits_cast")
        extra = {"swiglu_fusion": 1} if activation.value == "swiglu" else {}
        moe = helper.make_node("MoE", [inputs[0], cast.output[0]] + inputs[2:], list(node.output),
                               name=node.name + "/ort", domain="com.microsoft", k=attrs["top_k"],
                               activation_type="swiglu" if extra else "gelu",
                               normalize_routing_weights=attrs["normalize_routing_weights"], **extra)
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
