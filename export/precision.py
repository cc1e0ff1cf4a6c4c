"""`--precision`: the one vocabulary for how an export stores its weights and activations.

fp32 / fp16 are written by export/onnx_export.py directly; int8 / int4 / fp8 are quantised from an fp32
export by calibration/ (onnxruntime graphs: calibration/quantize.py, TensorRT Q/DQ: calibration/modelopt_qdq.py,
whose ModelOptMode is ModelOpt's own algorithm names, e.g. int4 -> int4_awq).
"""
from __future__ import annotations

from enum import Enum


class Precision(str, Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"
    INT4 = "int4"
    FP8 = "fp8"

    @property
    def quantised(self) -> bool:
        return self in (Precision.INT8, Precision.INT4, Precision.FP8)

    @property
    def needs_calibration(self) -> bool:
        return self in (Precision.INT8, Precision.FP8)  # int4 is weight-only round-to-nearest

    @property
    def dtype(self):
        """The torch dtype a float export is traced in (torch imported here: export has it anyway)."""
        import torch
        if self.quantised:
            raise ValueError(f"{self.value} is quantised from an fp32 export, not traced in its own dtype")
        return torch.float16 if self is Precision.FP16 else torch.float32
