"""`moe-export --target tensorrt`: engines from a checkpoint or an ONNX export, with ModelOpt Q/DQ graphs
for --precision int8|int4|fp8.

The orchestration lives here, above export/, because it needs both layers: export.tensorrt_build builds the
engines and calls back (`write_quantised`) into calibration.modelopt_qdq for quantised graphs. Nothing heavy
is imported until a quantised graph is asked for: --from-onnx on a Jetson needs neither torch nor onnx.
"""
from __future__ import annotations

from pathlib import Path

from export.tensorrt_build import export_tensorrt
from runtime.errors import UserError


def export_tensorrt_quantised(calib_data: str | Path | None = None, calib_min_tokens: int = 32,
                              **build) -> Path:
    """export_tensorrt(**build) whose quantised graphs come from the coverage-driven calibration set."""
    def write_quantised(model, stage: Path, impl: str, precision: str, vision_tower, plugins=None) -> None:
        if precision == "int4" and impl == "plugin":  # INT4 experts in the plugin + INT4 DQ MatMuls, no calibration
            from moe_llava.loading import load_pretrained

            from .trt_int4_export import export_int4_for_tensorrt
            export_int4_for_tensorrt(load_pretrained(model, vision_tower), stage)
            return
        try:
            from .modelopt_qdq import export_modelopt
        except ImportError:
            raise UserError(f"--precision {precision} needs the quantisation extra (pip install "
                            "'moe-llava-edge[quant]'); or quantise elsewhere and build with --from-onnx") from None
        export_modelopt(model, stage, impl, precision, vision_tower, calib_data=calib_data,
                        calib_min_tokens=calib_min_tokens, plugins=plugins)

    return export_tensorrt(write_quantised=write_quantised, **build)
