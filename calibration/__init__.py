"""Calibration and quantisation: onnxruntime weight-only int8/int4 exports, calibration sets with expert coverage,
ModelOpt Q/DQ for TensorRT, accuracy reports.

  data.py         calibration samples (synthetic demo set, LLaVA-JSON, image folder)
  coverage.py     ExpertCoverage + RouterRecorder (router forward hooks)
  calibset.py     samples through the PyTorch model; coverage-driven selection
  readers.py      calibration tensors per exported part (ModelOpt arrays)
  graph.py        ONNX passes: routers, weight nodes, folding, float inputs
  blockwise.py    block-wise weight quantisation (MatMulNBits / QMoE / GatherBlockQuantized layout)
  tensor_io.py    one initializer at a time: external-data reads and writes (parts of any size)
  qmoe.py         com.microsoft.MoE -> QMoE;  embedding.py  Gather -> GatherBlockQuantized
  weight_only.py  int8 / int4 weight-only plans (MatMulNBits, QMoE, GatherBlockQuantized) for one part
  part_io.py      load / save one part (streamed or whole), PartReport
  quantize.py     export_quantized (moe-export --precision int8|int4|fp8, onnx target)
  modelopt_qdq.py ModelOpt int8 / fp8 / int4_awq Q/DQ (TensorRT target)
  tensorrt_quantised.py  moe-export --target tensorrt: export.tensorrt_build with the Q/DQ graphs above
  trt_int4.py     INT4 weight-only TensorRT graphs: plugin INT4 experts, INT4 DequantizeLinear MatMuls;
                  qmoe_twin (the onnxruntime twin of an INT4 plugin node, for validation)
  trt_int4_export.py  checkpoint -> fp16 plugin export -> INT4 TensorRT graphs, validated
  validation.py   validation.json figures of a quantised export; pope.py  POPE F1 of a Pipeline
  report.py       precision_table: size, agreement, POPE F1, decode speed per export
Heavy imports (torch, onnxruntime.quantization, modelopt) happen inside the functions that need them.
"""
