"""INT4 weight-only graphs for TensorRT (`--precision int4` with the plugin lowering), from an fp16 plugin export.

- MoE experts: every MoELlavaMoE node gets weight_bits=4 and group_size G, its fc1/fc2 weights become packed
  codes (int32 [E,N,K/8]) and inputs 6-7 the fp16 group scales - runtime/plugins/README.md's contract, written
  by calibration/blockwise.py's quantiser (the one that feeds onnxruntime's QMoE).
- Dense MatMuls (attention, dense MLPs, vision tower, projector): weight W [K,N] -> DequantizeLinear(int4 [K,N],
  fp16 scales [K/G,N], axis=0, block_size=G) -> MatMul, the opset-21 block-quantised pattern TensorRT's ONNX
  parser turns into INT4 weight-only GEMMs (symmetric: TensorRT refuses non-zero zero points). The LM head gets
  INT8 per-channel DequantizeLinear (axis=1), as the onnxruntime int4 export keeps it at 8 bit for accuracy.
- Routers stay fp32 (calibration.graph.router_nodes), embeddings fp16 (a Gather table).
G: 128 where it divides the reduced width (every released model), else 64 or 32; round-to-nearest, no
calibration. onnxruntime runs these graphs too (DequantizeLinear-21 on CPU; the plugin nodes via QMoE, see
plugin_swap.py), which is how the export is validated here.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from export.moe_lowering import PLUGIN_OP
from runtime.errors import UserError

from .blockwise import BlockQuant, quantize
from .graph import drop_unused_initializers, gemm_to_matmul, initializers, output_heads, router_nodes, \
    weight_nodes
from .qmoe import qmoe_node

GROUP_SIZES = (128, 64, 32)  # preferred first; the plugin kernels take exactly these
DQ_OPSET = 21                # DequantizeLinear with int4 and block_size


@dataclass
class Int4Report:
    moe_nodes: int = 0          # plugin nodes with INT4 experts
    int4_matmuls: int = 0       # dense MatMuls with INT4 block-quantised weights
    int8_heads: int = 0         # LM heads with INT8 per-channel weights
    float_routers: int = 0      # router MatMuls, kept fp32 on purpose
    float_matmuls: int = 0      # other weight MatMuls left in float (no group divides their K)

    def to_dict(self) -> dict:
        return {"int4_moe_nodes": self.moe_nodes, "int4_matmuls": self.int4_matmuls, "int8_heads": self.int8_heads,
                "float_routers": self.float_routers, "float_matmuls": self.float_matmuls}


def group_for(*widths: int) -> int | None:
    return next((g for g in GROUP_SIZES if all(w % g == 0 for w in widths)), None)


def quantize_for_tensorrt(model: onnx.ModelProto) -> Int4Report:
    """In place: INT4 experts in the plugin nodes, INT4/INT8 weight-only dense MatMuls; the report says what."""
    report = Int4Report(moe_nodes=quantize_plugin_experts(model))
    routers = {n.name for n in router_nodes(model)}
    report.float_routers = len(routers)
    gemm_to_matmul(model, skip=routers)
    heads = {n.name for n in output_heads(model)}
    inits, done = initializers(model), {}
    dq_nodes = []
    for node in weight_nodes(model, ("MatMul",)):  # routers excluded
        weight = inits[node.input[1]]
        head = node.name in heads
        group = None if head else group_for(weight.dims[0])
        if len(weight.dims) != 2 or (not head and group is None):
            report.float_matmuls += 1
            continue
        if weight.name not in done:
            dq, done[weight.name] = _dequantize_node(model, weight, group)
            dq_nodes.append(dq)
        node.input[1] = done[weight.name]
        report.int8_heads += head
        report.int4_matmuls += not head
    for dq in reversed(dq_nodes):  # their inputs are initializers: first in the graph keeps it sorted
        model.graph.node.insert(0, dq)
    drop_unused_initializers(model)
    _require_opset(model, DQ_OPSET)
    return report


def quantize_plugin_experts(model: onnx.ModelProto) -> int:
    """Every MoELlavaMoE node's experts to INT4 (in place); returns how many nodes."""
    inits = initializers(model)
    count = 0
    for node in (n for n in model.graph.node if n.op_type == PLUGIN_OP):
        fc1, fc2 = (numpy_helper.to_array(inits[node.input[i]]) for i in (2, 4))
        hidden, inter = fc1.shape[2], fc2.shape[2]
        group = group_for(hidden, inter)
        if group is None:
            raise UserError(f"{node.name}: INT4 experts need hidden ({hidden}) and expert width ({inter}) to be "
                            f"multiples of 32; export this model with --precision fp16")
        scale_names = []
        for slot, weight in ((2, fc1), (4, fc2)):
            codes, scales = quantize(weight, BlockQuant(4, group))  # uint8 [E,N,K/2]: the int32 words' bytes
            name = f"{node.input[slot]}.int4g{group}"
            model.graph.initializer.extend([
                numpy_helper.from_array(np.ascontiguousarray(codes).view(np.int32), name),
                numpy_helper.from_array(scales.astype(np.float16), name + ".scales")])
            node.input[slot] = name
            scale_names.append(name + ".scales")
        node.input.extend(scale_names)
        node.attribute.extend([helper.make_attribute("weight_bits", 4), helper.make_attribute("group_size", group)])
        count += 1
    drop_unused_initializers(model)
    return count


def _dequantize_node(model: onnx.ModelProto, weight: onnx.TensorProto, group: int | None):
    """DequantizeLinear for a [K,N] MatMul weight: INT4 blocks of `group` along K, or (None) INT8 per column.
    Adds the quantised initializers; returns (node, its output name)."""
    w = numpy_helper.to_array(weight)
    bits = 4 if group else 8
    codes, scales = quantize(np.ascontiguousarray(w.T), BlockQuant(bits, group))  # rows = output columns n
    if bits == 4:
        codes = np.stack([codes & 0x0F, codes >> 4], axis=-1).reshape(codes.shape[0], -1)  # [N,K] 0..15
    values = (codes.astype(np.int16) - (1 << (bits - 1))).astype(np.int8).T  # [K,N] signed, zero point 0
    base = f"{weight.name}.int{bits}"
    scale = np.ascontiguousarray(scales.T if bits == 4 else scales).astype(w.dtype)  # [K/G,N] or [N]
    model.graph.initializer.extend([_int_tensor(values, base, bits), numpy_helper.from_array(scale, base + ".scale")])
    attrs = dict(axis=0, block_size=group) if group else dict(axis=1)
    node = helper.make_node("DequantizeLinear", [base, base + ".scale"], [base + ".dq"], name=base + "/dq", **attrs)
    return node, base + ".dq"


def _int_tensor(values: np.ndarray, name: str, bits: int) -> onnx.TensorProto:
    """Signed codes (int8 array) -> an INT8 initializer, or INT4: two per byte, the first in the low nibble."""
    if bits == 8:
        return numpy_helper.from_array(np.ascontiguousarray(values), name)
    flat = values.astype(np.uint8).reshape(-1) & 0x0F
    packed = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)  # K*N is even: K is a multiple of the group
    return helper.make_tensor(name, TensorProto.INT4, values.shape, packed.tobytes(), raw=True)


def _require_opset(model: onnx.ModelProto, version: int) -> None:
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version < version:
            opset.version = version  # 18 -> 21 adds types and block quantisation; no op changes meaning
    model.ir_version = max(model.ir_version, 10)  # INT4 tensors


def qmoe_twin(model: onnx.ModelProto, moe: onnx.NodeProto, inputs: list[str], group: int) -> onnx.NodeProto:
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
