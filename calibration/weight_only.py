"""Weight-only quantisation of one exported part for onnxruntime's CPU kernels (int8 and int4 exports).

    MatMul / Gemm with an initializer weight  -> com.microsoft.MatMulNBits (block-wise along K, symmetric)
    com.microsoft.MoE experts                 -> com.microsoft.QMoE (qmoe.py)
    Gather on an embedding table              -> com.microsoft.GatherBlockQuantized (embedding.py)
    routers, norms, attention scores, the vision patch Conv: float

No calibration data: weights are rounded to nearest, activations stay float between ops. accuracy_level 4
lets MatMulNBits / QMoE quantise their input row to int8 per block on the fly (dynamic, not calibrated) and
run an int8 dot product: onnxruntime 1.32's only fast CPU path for 8-bit weights. Measured on the 2-core
development VM, one MatMul at M=1, 1 thread, ms (benchmarks/quant_kernels.py; a shared machine):

    K x N        fp32   8b/32 acc0  8b/128 acc0  8b/32 acc4  8b/128 acc4  4b/32 acc0  4b/32 acc4  4b/128 acc4
    512 x 8192   0.99   103         64           0.25        0.18         0.45        0.12        0.09
    2048 x 8192  32.6*  797         491          1.54        0.73         3.95        0.58        0.45
    (* a loaded machine; 3.8 ms idle.) accuracy_level 0 with 8 bits dequantises per call: the slow path.

Which node gets which setting is decided by the weight's role, found from the graph (graph.py: routers by
what consumes their output, the LM head by reaching a graph output), never by node position or name, so the
plan holds on whatever graph the exporter writes. A role set to None stays float; `layers` limits dense and
expert quantisation to some decoder layers (decoder_layers in graph.py; benchmarks/quant_sensitivity.py).

The LM head is 8 bit, block 128, in both precisions: in 4 bit it alone cut the demo model's greedy agreement
to 0.469, and 8 bit at accuracy_level 4 is 5x faster than the fp32 head (0.18 vs 0.99 ms above). At the
released vocab (100352 x 2048) it is 205 MB per token instead of 103 MB in 4 bit: PLANS["int4"].head is the
knob. int8's other weights use block 32 (experts 64): on the demo model it cuts how far int8 moves PyTorch's
top-2 logit margins by a quarter (benchmarks/int8_plans.py); decode stays >= 2x fp32 on the `small` and
300m presets, prefill goes from ~0.8x fp32's time to ~0.9x (block 32 MatMulNBits at many rows is slower
than fp32 SGEMM).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import helper

from .blockwise import BlockQuant
from .embedding import quantize_embeddings
from .graph import decoder_layers, fold_constant_weights, output_heads, router_nodes, weight_nodes
from .part_io import PartReport, finish_streamed
from .qmoe import moe_nodes, quantize_moe_experts
from .tensor_io import TensorIO


@dataclass(frozen=True)
class NBits:
    """One MatMulNBits setting: bits per weight, block length along K, onnxruntime accuracy_level."""
    bits: int
    block_size: int
    accuracy_level: int = 4   # int8 activations in the kernel; 0 = float (slow for 8 bit)


@dataclass(frozen=True)
class WeightOnlyPlan:
    dense: NBits | None              # every weight MatMul/Gemm but routers and the LM head
    head: NBits | None               # the LM head
    expert_bits: int | None          # QMoE, accuracy_level 4
    embedding_bits: int | None       # GatherBlockQuantized
    expert_block: int | str = "auto"   # QMoE block along K; "auto": blockwise.block_for
    layers: frozenset[int] | None = None   # decoder layers whose dense / expert weights are quantised; None: all


EIGHT_BIT = NBits(8, 128)
PLANS = {
    # int8: dense MatMuls (vision tower, projector, decoder attention / dense FFN) at block 32, experts at
    # block 64, the LM head at block 128. Demo model, one role at a time (benchmarks/int8_plans.py roles):
    # mean change of PyTorch's top-2 logit margin at block 128 -> 32: vision 0.0090 -> 0.0064, decoder dense
    # 0.0074 -> 0.0053, experts 0.0049 -> 0.0036, LM head 0.0067 -> 0.0064 (no block helps the head, and 32
    # would double its time at the released vocab). Whole plan: 0.0171 (block 128 everywhere; greedy 0.921)
    # -> 0.0134 (greedy 0.984); the plain greedy figure swings with near-ties, the margin error does not.
    # Experts at 64, not 32 (0.0043 vs 0.0036 alone): 32 brought prefill to fp32's or above (`small`
    # 0.95-1.06x), 64 keeps it under (0.90-0.97x; 300m 0.86-0.89x); README, Quantised exports.
    "int8": WeightOnlyPlan(dense=NBits(8, 32), head=EIGHT_BIT, expert_bits=8, embedding_bits=8, expert_block=64),
    # int4: block 128 and an 8-bit LM head. Demo model, greedy agreement (plain) / logit cosine / size:
    # 4/32 + head 4/32: 0.570 / 0.99972 / 2.25 MB; 4/32 + head 8: 0.598 / 0.99994 / 2.28 MB;
    # 4/128 + head 8: 0.866 / 0.99993 / 2.24 MB (README, Quantised exports). The head alone in 4 bit: 0.469.
    # Experts: QMoE 4 bit block 64 (0.866; block 32: 0.866 and 3 % slower prefill on `small`; block 128:
    # 0.748, 13 % faster prefill).
    "int4": WeightOnlyPlan(dense=NBits(4, 128), head=EIGHT_BIT, expert_bits=4, embedding_bits=4, expert_block=64),
}


def quantize_weight_only(src: Path, dst: Path, plan: WeightOnlyPlan) -> PartReport:
    """Quantise the part `src` by `plan` into `dst`; routers stay float.

    Streamed (tensor_io.py): the graph is read without its weights and each weight is read, quantised and
    written on its own, so the peak is about one float tensor, not the part (12.8 GB for a released decoder)."""
    model = onnx.load(str(src), load_external_data=False)
    io = TensorIO(model, source_dir=src.parent, data_path=dst.with_name(dst.name + ".data"),
                  progress=f"quantising {src.stem}")
    io.absorb_casts()
    fold_constant_weights(model, io)
    routers = {n.name for n in router_nodes(model)}
    groups = assign(model, plan)
    report = PartReport(quantized_nodes=sum(map(len, groups.values())), float_nodes=sorted(routers))
    for spec, names in groups.items():
        matmul_nbits(model, names, spec, io)
    report.moe_nodes, report.moe_float = quantize_experts(model, plan, io)
    if plan.embedding_bits:
        report.embeddings = quantize_embeddings(model, bits=plan.embedding_bits, io=io)
    finish_streamed(model, io, dst)
    return report


def assign(model: onnx.ModelProto, plan: WeightOnlyPlan) -> dict[NBits, set[str]]:
    """{setting: node names} for every weight MatMul/Gemm (routers are never weight_nodes)."""
    heads = {n.name for n in output_heads(model)}
    in_scope = _layer_filter(model, plan)
    groups: dict[NBits, set[str]] = {}
    for node in weight_nodes(model, ("MatMul", "Gemm")):
        spec = plan.head if node.name in heads else plan.dense if in_scope(node) else None
        if spec is not None:
            groups.setdefault(spec, set()).add(node.name)
    return groups


def _layer_filter(model: onnx.ModelProto, plan: WeightOnlyPlan):
    if plan.layers is None:
        return lambda node: True
    layer = decoder_layers(model)
    return lambda node: layer.get(node.name) in plan.layers


def matmul_nbits(model: onnx.ModelProto, names: set[str], spec: NBits, io: TensorIO) -> int:
    """com.microsoft.MatMulNBits for the MatMul / Gemm nodes `names` (in place); returns how many.

    B = the weight's block-wise codes [N, K/block, block*bits/8], scales [N, K/block], no zero points (the
    op's default centre 2^(bits-1)): bit for bit what onnxruntime's MatMulNBitsQuantizer writes with
    is_symmetric=True, K padded to whole blocks (tests/calibration/test_weight_streaming.py). A Gemm's bias
    becomes an Add."""
    nodes, count = [], 0
    for node in model.graph.node:
        plain = node.name in names and _plain_product(node) and node.input[1] in io
        k, n = _k_n(node, io.shape(node.input[1])) if plain else (0, 0)
        if not plain:
            nodes.append(node)
            continue
        nodes.extend(_nbits_nodes(node, k, n, spec, io))
        count += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return count


def _plain_product(node: onnx.NodeProto) -> bool:
    """MatMul, or Gemm computing A @ op(B) + C with alpha = beta = 1 and A untransposed."""
    if node.op_type == "MatMul":
        return True
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return node.op_type == "Gemm" and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 \
        and not attrs.get("transA", 0)


def _transposed(node: onnx.NodeProto) -> bool:
    """True when the weight is stored [N, K] (Gemm transB=1), False for [K, N]."""
    return node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)


def _k_n(node: onnx.NodeProto, shape: tuple[int, ...]) -> tuple[int, int]:
    return (shape[1], shape[0]) if _transposed(node) else (shape[0], shape[1])


def _nbits_nodes(node: onnx.NodeProto, k: int, n: int, spec: NBits, io: TensorIO) -> list[onnx.NodeProto]:
    weight = node.input[1]
    codes, scales = io.quantize(weight, BlockQuant(spec.bits, spec.block_size), k_first=not _transposed(node))
    base = f"{weight}.q{spec.bits}"
    io.add(base, codes.reshape(n, -(-k // spec.block_size), -1))
    io.add(base + ".scales", scales)
    bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else None
    out = node.output[0] + "_nbits" if bias else node.output[0]
    attrs = dict(K=k, N=n, bits=spec.bits, block_size=spec.block_size)
    if spec.accuracy_level:
        attrs["accuracy_level"] = spec.accuracy_level
    made = [helper.make_node("MatMulNBits", [node.input[0], base, base + ".scales"], [out], name=node.name,
                             domain="com.microsoft", **attrs)]
    if bias:
        made.append(helper.make_node("Add", [out, bias], [node.output[0]], name=node.name + "/bias"))
    return made


def quantize_experts(model: onnx.ModelProto, plan: WeightOnlyPlan, io: TensorIO) -> tuple[int, int]:
    """(QMoE nodes, MoE nodes left float)."""
    in_scope = _layer_filter(model, plan)
    nodes = moe_nodes(model)
    chosen = {n.input[2] for n in nodes if in_scope(n)}
    done = quantize_moe_experts(model, plan.expert_bits, plan.expert_block, accuracy_level=4, fc1_names=chosen,
                                io=io) if plan.expert_bits and chosen else 0
    return done, len(nodes) - done
