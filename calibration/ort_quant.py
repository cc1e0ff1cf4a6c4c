"""ONNX Runtime quantisation of one exported part (CPU-runnable graphs).

int8  static Q/DQ (onnxruntime.quantization.quantize_static, QDQ format, MinMax ranges from the calibration
      reader) on the MatMul/Gemm/Conv nodes that carry a weight: U8U8 - uint8 activations per tensor, uint8
      weights per output channel, both asymmetric, full 8-bit range. Not S8S8: onnxruntime's x86 AVX2 int8
      GEMM without VNNI saturates its 16-bit pair sums with full-range signed weights (demo model: greedy
      agreement 0.54, logit cosine 0.997) and reduce_range's 7-bit weights cost accuracy (greedy 0.977 vs
      1.000 for U8U8, which is also faster here). The LM head is weight-only 8 bit instead (MatMulNBits,
      fp32 activations): per-tensor int8 of the final hidden state was the largest source of greedy
      divergence on the demo model. Routers, norms, softmax, attention score MatMuls and everything else
      stay float and read float tensors. com.microsoft.MoE experts -> QMoE 8 bit (block-wise, int8
      activations: 8x faster than per-row scales, same accuracy - qmoe.py); embedding tables ->
      GatherBlockQuantized 8 bit.
int4  weight only: MatMulNBits (4 bit, block 32 along K, asymmetric) for the dense MatMuls (Gemm with a
      constant weight is rewritten to MatMul first), QMoE 4 bit (block 32) for com.microsoft.MoE experts,
      both with accuracy_level 4 (int8 activations in the GEMMs: ~5x faster decode on this CPU, same
      cosine), GatherBlockQuantized 4 bit for embedding tables. The LM head is weight-only 8 bit (demo:
      logit cosine 0.99977 -> 0.99995 for +0.4 % size). Routers stay fp32; the vision patch Conv stays float.
The portable lowering's per-expert weights are folded into initializers first, so its expert MatMuls are
quantised like any other (int8: calibrated on the tokens routed to that expert - see coverage.py).
"""
from __future__ import annotations

import contextlib
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from runtime.errors import UserError

from .embedding import quantize_embeddings
from .graph import (fold_constant_weights, gemm_to_matmul, keep_float_inputs, output_heads, router_nodes,
                    weight_nodes)
from .qmoe import moe_nodes, quantize_moe_experts

INT8_OPS = ("MatMul", "Gemm", "Conv")
HEAD_BLOCK = 32
INT4_BLOCK = 32
INT4_ACCURACY_LEVEL = 4  # int8 activations inside MatMulNBits / QMoE (weights stay 4 bit)
EXTERNAL_DATA_BYTES = 1 << 30


@dataclass
class PartReport:
    quantized_nodes: int = 0     # MatMul/Gemm/Conv nodes with quantised weights
    embeddings: int = 0          # Gather tables turned into GatherBlockQuantized
    float_nodes: list[str] = field(default_factory=list)  # weight nodes kept float on purpose (routers)
    moe_nodes: int = 0           # com.microsoft.MoE nodes turned into QMoE
    moe_float: int = 0           # MoE nodes left float (widths not divisible by the block)

    def to_dict(self) -> dict:
        return {"quantized_nodes": self.quantized_nodes, "embedding_tables": self.embeddings,
                "float_routers": self.float_nodes,
                "qmoe_nodes": self.moe_nodes, "float_moe_nodes": self.moe_float}


def load(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path))


def weight_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def save(model: onnx.ModelProto, path: Path) -> None:
    """One file, or graph + path.name.data beside it when the weights pass 1 GiB (protobuf stops at 2)."""
    big = weight_bytes(model) > EXTERNAL_DATA_BYTES
    onnx.save(model, str(path), save_as_external_data=big, location=path.name + ".data" if big else None)


def quantize_int8(src: Path, dst: Path, feeds: list[dict] | None) -> PartReport:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from .readers import calibration_reader
    model = load(src)
    fold_constant_weights(model)
    routers = [n.name for n in router_nodes(model)]
    heads = {n.name for n in output_heads(model)}
    targets = [n.name for n in weight_nodes(model, INT8_OPS) if n.name not in heads]
    report = PartReport(quantized_nodes=len(targets) + len(heads), float_nodes=routers)
    if targets:
        if not feeds:
            raise UserError(f"{src.name}: no calibration data for it (the vision parts need samples with images)")
        with tempfile.TemporaryDirectory() as tmp, _quiet_quantizer():
            source, staged = Path(tmp) / "f.onnx", Path(tmp) / "q.onnx"
            save(model, source)  # a path, not the proto: big models go through external data
            quantize_static(str(source), str(staged), calibration_reader(feeds), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QUInt8, per_channel=True,
                            reduce_range=False, op_types_to_quantize=list(INT8_OPS), nodes_to_quantize=targets,
                            nodes_to_exclude=routers, calibrate_method=CalibrationMethod.MinMax,
                            use_external_data_format=weight_bytes(model) > EXTERNAL_DATA_BYTES,
                            extra_options={"MatMulConstBOnly": True, "WeightSymmetric": False,
                                           "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1}})
            model = load(staged)
        keep_float_inputs(model, set(targets))
    if heads:
        model = _weight_only(model, heads, routers, bits=8, block_size=HEAD_BLOCK, accuracy_level=0)
    report.moe_nodes, report.moe_float = _quantize_experts(model, bits=8)
    report.embeddings = quantize_embeddings(model, bits=8)
    save(model, dst)
    return report


def quantize_int4(src: Path, dst: Path, block_size: int = INT4_BLOCK) -> PartReport:
    model = load(src)
    fold_constant_weights(model)
    routers = [n.name for n in router_nodes(model)]
    heads = {n.name for n in output_heads(model)}
    targets = {n.name for n in weight_nodes(model, ("MatMul", "Gemm"))} - heads
    report = PartReport(quantized_nodes=len(targets) + len(heads), float_nodes=routers)
    if targets:
        model = _weight_only(model, targets, routers, bits=4, block_size=block_size,
                             accuracy_level=INT4_ACCURACY_LEVEL)
    if heads:
        model = _weight_only(model, heads, routers, bits=8, block_size=HEAD_BLOCK, accuracy_level=0)
    report.moe_nodes, report.moe_float = _quantize_experts(model, bits=4, accuracy_level=INT4_ACCURACY_LEVEL)
    report.embeddings = quantize_embeddings(model, bits=4)
    save(model, dst)
    return report


def _weight_only(model: onnx.ModelProto, names: set[str], routers: list[str], bits: int, block_size: int,
                 accuracy_level: int) -> onnx.ModelProto:
    """MatMulNBits for the nodes `names` (their Gemms rewritten to MatMul first); routers never."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    gemm_to_matmul(model, skip={n.name for n in model.graph.node if n.name not in names})
    others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in names]
    with _quiet_quantizer():
        quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=bits == 8,
                                         accuracy_level=accuracy_level or None, nodes_to_exclude=routers + others,
                                         op_types_to_quantize=("MatMul",))
        quantizer.process()
    return quantizer.model.model


def _quantize_experts(model: onnx.ModelProto, bits: int, accuracy_level: int = 0) -> tuple[int, int]:
    total = len(moe_nodes(model))
    done = quantize_moe_experts(model, bits, accuracy_level=accuracy_level) if total else 0
    return done, total - done


@contextlib.contextmanager
def _quiet_quantizer():
    """onnxruntime.quantization logs every skipped node at INFO/WARNING; keep the CLI readable."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
