"""Small ONNX graph passes used by the quantisers (pure onnx + numpy, in place on a ModelProto).

- router_nodes (export/routers.py): the fp32 router MatMul/Gemm of every MoE layer.
- weight_nodes: MatMul/Gemm/Conv/Gather nodes whose weight is an initializer (what gets quantised);
  output_heads: those whose output is a graph output (the LM head).
- decoder_layers: node -> decoder layer index, from the layer-numbered initializers (norm weights, biases)
  its layer's nodes read, carried forward in topological order (sensitivity studies only).
- fold_constant_weights: Gather(initializer, constant index) and Transpose(initializer) become initializers,
  so the portable lowering's per-expert weights (Gather(fc1, e) -> Transpose -> MatMul) are plain weights.
- gemm_to_matmul: Gemm(A, B, C) with a constant B -> MatMul(A, B') [+ Add C] (MatMulNBits takes MatMul only).
- read_float_inputs: after QDQ insertion, nodes that are not quantised read the float tensor again instead
  of its QuantizeLinear -> DequantizeLinear copy (ModelOpt rewires every consumer of a calibrated tensor,
  excluded nodes included).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from export.routers import consumers, router_nodes  # noqa: F401 (router_nodes: used by the quantisers)

WEIGHT_INPUT = {"MatMul": 1, "Gemm": 1, "Conv": 1, "Gather": 0}


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {i.name: i for i in model.graph.initializer}


def weight_nodes(model: onnx.ModelProto, op_types=tuple(WEIGHT_INPUT)) -> list[onnx.NodeProto]:
    """Nodes of `op_types` whose weight input is a >= 2-D initializer, routers excluded."""
    inits = initializers(model)
    routers = {n.name for n in router_nodes(model)}
    found = []
    for node in model.graph.node:
        slot = WEIGHT_INPUT.get(node.op_type)
        if node.op_type in op_types and slot is not None and node.name not in routers and len(node.input) > slot:
            weight = inits.get(node.input[slot])
            if weight is not None and len(weight.dims) >= 2:
                found.append(node)
    return found


def output_heads(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Weight MatMul/Gemm nodes whose output is a graph output (directly or through Cast/Reshape): lm_head."""
    outputs, users = {o.name for o in model.graph.output}, consumers(model)

    def reaches_output(tensor: str, hops: int = 2) -> bool:
        if tensor in outputs:
            return True
        return hops > 0 and any(u.op_type in ("Cast", "Reshape") and reaches_output(u.output[0], hops - 1)
                                for u in users.get(tensor, []))
    return [n for n in weight_nodes(model, ("MatMul", "Gemm")) if reaches_output(n.output[0])]


def decoder_layers(model: onnx.ModelProto) -> dict[str, int]:
    """{node name: layer} - a node belongs to the last `layers.N.` initializer read at or before it."""
    import re
    pattern, layer, found = re.compile(r"layers\.(\d+)\."), None, {}
    for node in model.graph.node:
        numbers = [int(m.group(1)) for name in node.input for m in [pattern.search(name)] if m]
        layer = max(numbers) if numbers else layer
        if layer is not None:
            found[node.name] = layer
    return found


def fold_constant_weights(model: onnx.ModelProto, io=None) -> int:
    """Fold Gather(const, const) / Transpose(const) chains into initializers; returns nodes folded. `io`
    (tensor_io.TensorIO) reads and writes the weights; default: in the proto."""
    from .tensor_io import TensorIO
    io = io or TensorIO(model)
    folded, kept = {}, []
    for node in model.graph.node:
        foldable = node.op_type in ("Gather", "Transpose") and node.input and \
            all(i in folded or i in io for i in node.input)
        if not foldable:
            kept.append(node)
            continue
        values = [folded[i] if i in folded else io.read(i) for i in node.input]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Gather":
            folded[node.output[0]] = np.take(values[0], values[1], axis=attrs.get("axis", 0))
        else:
            folded[node.output[0]] = np.transpose(values[0], attrs.get("perm"))
    if folded:
        used = {i for n in kept for i in n.input} | {o.name for o in model.graph.output}
        for name, value in folded.items():
            if name in used:
                io.add(name, value)
        del model.graph.node[:]
        model.graph.node.extend(kept)
        drop_unused_initializers(model)
    return len(folded)


def gemm_to_matmul(model: onnx.ModelProto, skip: set[str]) -> int:
    """Gemm with a constant B (alpha = beta = 1, transA = 0) -> MatMul [+ Add]; returns how many."""
    inits, nodes, count = initializers(model), [], 0
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        simple = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        if node.op_type != "Gemm" or node.name in skip or not simple or node.input[1] not in inits:
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        name = node.input[1] + ("_T" if attrs.get("transB", 0) else "")
        if name not in inits:
            inits[name] = numpy_helper.from_array(np.ascontiguousarray(weight.T if attrs.get("transB", 0)
                                                                       else weight), name)
            model.graph.initializer.append(inits[name])
        bias = len(node.input) > 2 and node.input[2]
        mm_out = node.output[0] + "_mm" if bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], name], [mm_out], name=node.name))
        if bias:
            nodes.append(helper.make_node("Add", [mm_out, node.input[2]], [node.output[0]], name=node.name + "/bias"))
        count += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    drop_unused_initializers(model)
    return count


def read_float_inputs(model: onnx.ModelProto, names: set[str]) -> int:
    """The nodes called `names` read x instead of DequantizeLinear(QuantizeLinear(x)); dead Q/DQ removed."""
    prod, rewired = producers(model), 0
    for node in model.graph.node:
        if node.name not in names:
            continue
        for i, name in enumerate(node.input):
            source = float_source(prod, name)
            if source is not None:
                node.input[i] = source
                rewired += 1
    remove_dead_nodes(model)
    return rewired


def float_source(prod: dict[str, onnx.NodeProto], tensor: str) -> str | None:
    """x when `tensor` = DequantizeLinear(QuantizeLinear(x)), else None."""
    dq = prod.get(tensor)
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    q = prod.get(dq.input[0])
    return q.input[0] if q is not None and q.op_type == "QuantizeLinear" else None


def remove_dead_nodes(model: onnx.ModelProto) -> None:
    """Drop nodes none of whose outputs is used (repeatedly), then unused initializers."""
    graph_outputs = {o.name for o in model.graph.output}
    while True:
        used = {i for n in model.graph.node for i in n.input} | graph_outputs
        alive = [n for n in model.graph.node if any(o in used for o in n.output)]
        if len(alive) == len(model.graph.node):
            break
        del model.graph.node[:]
        model.graph.node.extend(alive)
    drop_unused_initializers(model)


def drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def qdq_fed_inputs(model: onnx.ModelProto, node: onnx.NodeProto) -> list[str]:
    """Inputs of `node` that come out of a DequantizeLinear (or are quantised initializers)."""
    prod = producers(model)
    return [i for i in node.input if i in prod and prod[i].op_type in ("DequantizeLinear", "QuantizeLinear")]
