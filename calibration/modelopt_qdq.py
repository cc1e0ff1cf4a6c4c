"""NVIDIA ModelOpt Q/DQ ONNX for TensorRT's strongly typed engines: int8, fp8, int4 (AWQ).

    modelopt_qdq(decoder.onnx, decoder.int8.onnx, "int8", calibration_data, plugins=[libmoe_llava_plugin.so])

- calibration_data: {input name: array stacked on the batch axis} - `calibration_data()` below builds it
  from a CalibrationSet (readers.stacked: sequences cut to the shortest sample).
- Only MatMul/Gemm/Conv are quantised (as for onnxruntime int8). ModelOpt's default op list also puts Q/DQ
  on mask / scatter / gather tensors; on the tiny portable decoder that took fp8 logits to cosine 0.23
  against fp32 (0.99 with the restricted list).
- Routers stay in float: every router MatMul/Gemm (graph.router_nodes) goes to `nodes_to_exclude`, reads the
  float tensor (not the Q/DQ copy ModelOpt hands every consumer) and is checked for Q/DQ inputs.
- plugins: TensorRT plugin libraries for custom nodes (the `plugin` MoE lowering). ModelOpt then calibrates
  through the TensorRT execution provider, so plugin graphs need TensorRT; on a CPU-only machine
  calibrate the `portable` lowering (standard ops) with calibration_eps=["cpu"].
- ModelOpt runs in a child process: it monkeypatches onnxruntime.quantization's calibrators while it works,
  which would change onnxruntime.quantization under the weight-only path (weight_only.py) of the same
  process. Never import modelopt.onnx.quantization in-process next to calibration.quantize.
- modelopt_export_dir: a whole fp32 export directory -> Q/DQ export directory (what --target tensorrt needs).
Installed by the `quant` extra: nvidia-modelopt without its [onnx] extra (which pins onnx~=1.21 and
onnxruntime-gpu~=1.24, replacing our onnxruntime) plus the modules modelopt.onnx.quantization imports;
int8 / fp8 / int4 (awq_clip) run on CPU with onnx 1.23 and onnxruntime 1.32 (tests/calibration).
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from enum import Enum
from pathlib import Path

import numpy as np
import onnx

from runtime.errors import UserError

from .graph import qdq_fed_inputs, read_float_inputs, router_nodes

QUANTIZED_OPS = ("MatMul", "Gemm", "Conv")
ROOT = Path(__file__).resolve().parents[1]


class ModelOptMode(str, Enum):
    INT8 = "int8"
    FP8 = "fp8"
    INT4_AWQ = "int4_awq"

    @property
    def quantize_mode(self) -> str:
        return "int4" if self is ModelOptMode.INT4_AWQ else self.value

    @property
    def calibration_method(self) -> str:
        # int8: "max", not ModelOpt's default entropy, whose histograms fail on a tensor of zero range
        # (an expert that saw no calibration token in a batch); int4: activation-aware weight clipping
        return "awq_clip" if self is ModelOptMode.INT4_AWQ else "max"


def check_modelopt() -> None:
    """A one-line UserError when ModelOpt is missing (found without importing it: see run_modelopt)."""
    if importlib.util.find_spec("modelopt") is None or importlib.util.find_spec("onnx_graphsurgeon") is None:
        raise UserError("NVIDIA ModelOpt is not installed: pip install 'moe-llava-edge[quant]' (nvidia-modelopt) "
                        "for --target tensorrt quantisation")


def modelopt_qdq(onnx_path: str | Path, out_path: str | Path, mode: str, calibration_data: dict[str, np.ndarray],
                 plugins: list[str] | None = None, high_precision_dtype: str = "fp16",
                 calibration_eps: list[str] | None = None, op_types: tuple[str, ...] = QUANTIZED_OPS) -> Path:
    """Q/DQ copy of `onnx_path` at `out_path`; returns `out_path`. Non-quantised ops go to high_precision_dtype
    ("fp16" for TensorRT engines, "fp32" to compare on CPU)."""
    mode = ModelOptMode(mode)
    check_modelopt()
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    routers = [n.name for n in router_nodes(onnx.load(str(onnx_path), load_external_data=False))]
    data_bytes = sum(p.stat().st_size for p in onnx_path.parent.glob(onnx_path.name + "*"))
    args = dict(onnx_path=str(onnx_path), quantize_mode=mode.quantize_mode,
                calibration_method=mode.calibration_method,
                calibration_eps=calibration_eps or (["trt", "cuda:0", "cpu"] if plugins else ["cpu"]),
                op_types_to_quantize=list(op_types), nodes_to_exclude=[re.escape(n) + "$" for n in routers],
                trt_plugins=list(plugins or []) or None, high_precision_dtype=high_precision_dtype,
                output_path=str(out_path), use_external_data_format=data_bytes > (1 << 30), log_level="WARNING")
    run_modelopt(args, calibration_data)
    if not out_path.is_file():
        raise UserError(f"ModelOpt wrote no {out_path}")
    _routers_read_float(out_path, set(routers))
    return out_path


def run_modelopt(args: dict, calibration_data: dict[str, np.ndarray]) -> None:
    """modelopt.onnx.quantization.quantize(**args) in a child process.

    ModelOpt monkeypatches onnxruntime.quantization's calibrators and quantizers when it runs; in a child
    process onnxruntime.quantization in this process (weight_only.py's MatMulNBitsQuantizer) stays the stock one.
    """
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(Path(tmp) / "calibration.npz", **calibration_data)
        (Path(tmp) / "args.json").write_text(json.dumps(args))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        done = subprocess.run([sys.executable, "-m", "calibration.modelopt_qdq", tmp], env=env,
                              capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        raise UserError(f"ModelOpt {args['quantize_mode']} quantisation of {args['onnx_path']} failed: "
                        f"{lines[-1] if lines else 'exit code ' + str(done.returncode)}")


def _worker(directory: str) -> None:
    from modelopt.onnx.quantization import quantize
    args = json.loads((Path(directory) / "args.json").read_text())
    with np.load(Path(directory) / "calibration.npz") as data:
        quantize(calibration_data={k: data[k] for k in data.files}, **args)


def _routers_read_float(path: Path, routers: set[str]) -> None:
    """ModelOpt feeds an excluded router the Q/DQ copy of a tensor it shares with a quantised MatMul: undo that."""
    model = onnx.load(str(path), load_external_data=False)
    if read_float_inputs(model, routers):
        onnx.save(model, str(path))
    check_routers_float(model)


def check_routers_float(model: onnx.ModelProto) -> None:
    """Raise when a router MatMul/Gemm reads a Q/DQ tensor (routers must stay in float)."""
    quantized = {n.name: qdq_fed_inputs(model, n) for n in router_nodes(model)}
    bad = {name: inputs for name, inputs in quantized.items() if inputs}
    if bad:
        raise UserError(f"router nodes were quantised: {bad}")


def modelopt_export_dir(fp32_dir: str | Path, out_dir: str | Path, mode: str, calibration,
                        plugins: list[str] | None = None, high_precision_dtype: str = "fp16") -> Path:
    """An fp32 ONNX export directory -> the same directory with ModelOpt Q/DQ graphs (for TensorRT engines).

    vision, projector and decoder get Q/DQ (plugins only matter to the decoder); embed is a Gather and is
    copied; tokenizer copied; manifest precision = int8 / fp8 / int4 and a "quantization" entry.
    `calibration` is a CalibrationSet (calibration.quantize.calibration_set).
    """
    import json
    import shutil

    from runtime.manifest import MANIFEST_FILE, Manifest
    mode = ModelOptMode(mode)
    source, out_dir = Manifest.load(fp32_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for part in ("vision", "projector", "decoder"):
        modelopt_qdq(source.path(part), out_dir / source.parts[part].file, mode.value,
                     calibration_data(source, part, calibration), plugins if part == "decoder" else None,
                     high_precision_dtype)
    for name in (source.parts["embed"].file, source.tokenizer):
        shutil.copy(Path(fp32_dir) / name, out_dir / name)
    raw = json.loads((Path(fp32_dir) / MANIFEST_FILE).read_text())
    raw["precision"] = mode.quantize_mode
    raw["quantization"] = {"method": f"NVIDIA ModelOpt {mode.value} Q/DQ ({mode.calibration_method}), "
                                     f"MatMul/Gemm/Conv, routers float, rest {high_precision_dtype}",
                           "source_precision": "fp32", "calibration": calibration.summary()}
    (out_dir / MANIFEST_FILE).write_text(json.dumps(raw, indent=2) + "\n")
    return out_dir


PRECISION_MODES = {"int8": ModelOptMode.INT8, "fp8": ModelOptMode.FP8, "int4": ModelOptMode.INT4_AWQ}


def export_modelopt(model: str | Path, out: str | Path, moe_impl: str = "plugin", precision: str = "int8",
                    vision_tower: str | None = None, calib_data: str | Path | None = None,
                    calib_min_tokens: int = 32, plugins: list[str] | None = None,
                    high_precision_dtype: str = "fp16") -> Path:
    """Checkpoint -> ONNX export with ModelOpt Q/DQ graphs in `out` (atomic), for TensorRT engines.

    The counterpart of calibration.quantize.export_quantized for --target tensorrt: fp32 graphs in the
    requested lowering, the coverage-driven calibration set, then modelopt_export_dir. No onnxruntime
    validation (QMoE-free Q/DQ graphs are TensorRT's to run; fp8 does not run on onnxruntime CPU).
    """
    from export.attention_lowering import AttentionImpl
    from export.moe_lowering import MoEImpl
    from export.onnx_export import write_export
    from export.precision import Precision
    from export.output_dir import staged_output
    from moe_llava.loading import load_pretrained

    from .quantize import calibration_set
    if precision not in PRECISION_MODES:
        raise UserError(f"ModelOpt quantises to {', '.join(PRECISION_MODES)}, not {precision!r}")
    check_modelopt()
    loaded = load_pretrained(model, vision_tower)
    calibration = calibration_set(loaded, calib_data, calib_min_tokens)
    with staged_output(Path(out)) as staging, tempfile.TemporaryDirectory(
            prefix=f".{Path(out).name}.fp32.", dir=Path(out).parent) as fp32_dir:
        # standard-op attention: these graphs are TensorRT's (README, "Attention")
        write_export(loaded, Path(fp32_dir), MoEImpl(moe_impl).resolve("tensorrt"), Precision.FP32,
                     AttentionImpl.UNFUSED)
        modelopt_export_dir(fp32_dir, staging, PRECISION_MODES[precision].value, calibration, plugins,
                            high_precision_dtype)
    return Path(out)


def calibration_data(manifest, part: str, calibration) -> dict[str, np.ndarray]:
    """ModelOpt's calibration_data for `part` of an export (manifest) from a CalibrationSet."""
    from .readers import part_feeds, stacked
    return stacked(part_feeds(manifest, part, calibration.samples))


if __name__ == "__main__":
    _worker(sys.argv[1])
