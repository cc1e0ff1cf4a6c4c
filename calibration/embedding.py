"""Embedding tables (Gather on a [V,H] initializer) as com.microsoft.GatherBlockQuantized, weight-only.

uint8 codes [V, H*bits/8] quantised block-wise along H (blockwise.py), scales [V, H/block], gather_axis 0,
quantize_axis 1, default zero point 2^(bits-1). Only the gathered rows are dequantised - unlike a
DequantizeLinear in front of Gather, which would expand the whole table on every call. uint8 codes keep the
graph at its opset (no int4 tensor type needed).
"""
from __future__ import annotations

import onnx
from onnx import helper

from .blockwise import BlockQuant, block_for
from .graph import drop_unused_initializers
from .tensor_io import TensorIO


def quantize_embeddings(model: onnx.ModelProto, bits: int, io: TensorIO | None = None) -> int:
    """Gather(table [V,H] initializer, ids) -> GatherBlockQuantized; returns how many tables."""
    io, count = io or TensorIO(model), 0
    for i, node in enumerate(model.graph.node):
        table = node.input[0] if node.op_type == "Gather" and node.input[0] in io else None
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
        if table is None or len(io.shape(table)) != 2 or axis != 0:
            continue
        block = block_for([io.shape(table)[1]], bits)
        if block is None:
            continue
        codes, scales = io.quantize(table, BlockQuant(bits, block))
        base = f"{table}.q{bits}"
        io.add(base, codes)
        io.add(base + ".scales", scales)
        model.graph.node[i].CopyFrom(helper.make_node(
            "GatherBlockQuantized", [base, node.input[1], base + ".scales"], list(node.output),
            name=node.name, domain="com.microsoft", bits=bits, block_size=block, gather_axis=0, quantize_axis=1))
        count += 1
    if count:
        _import_ms_domain(model)
        drop_unused_initializers(model)
    return count


def _import_ms_domain(model: onnx.ModelProto) -> None:
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
