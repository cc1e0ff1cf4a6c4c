"""Static Q/DQ int8 of one exported part for onnxruntime (`--int8-scheme static`; calibrated).

onnxruntime.quantization.quantize_static, QDQ format, MinMax ranges from the calibration reader, on the
MatMul/Gemm/Conv nodes that carry a weight: U8U8 - uint8 activations per tensor, uint8 weights per output
channel, both asymmetric, full 8-bit range (not S8S8: the x86 AVX2 int8 GEMM without VNNI saturates its
16-bit pair sums with full-range signed weights; reduce_range's 7-bit weights cost accuracy). The LM head,
experts and embedding tables are weight-only as in the default scheme (weight_only.py). Routers, norms,
softmax and attention score MatMuls stay float and read float tensors.

Per-tensor activation ranges are what costs this scheme its accuracy on LLM decoders (activation outliers):
demo model greedy agreement 0.754 against 1.000 for weight-only int8 (README, Quantised exports). It is kept
as an option because it is the layout TensorRT consumes (calibration/modelopt_qdq.py) and it can be compared.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from runtime.errors import UserError

from .embedding import quantize_embeddings
from .graph import fold_constant_weights, keep_float_inputs, output_heads, router_nodes, weight_nodes
from .part_io import EXTERNAL_DATA_BYTES, PartReport, load, quiet_quantizer, save, weight_bytes
from .weight_only import EIGHT_BIT, PLANS, matmul_nbits, quantize_experts

INT8_OPS = ("MatMul", "Gemm", "Conv")


def quantize_int8_static(src: Path, dst: Path, feeds: list[dict] | None) -> PartReport:
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
        with tempfile.TemporaryDirectory() as tmp, quiet_quantizer():
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
        model = matmul_nbits(model, heads, EIGHT_BIT)
    report.moe_nodes, report.moe_float = quantize_experts(model, PLANS["int8"])
    report.embeddings = quantize_embeddings(model, bits=8)
    save(model, dst)
    return report
