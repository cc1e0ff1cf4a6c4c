"""`moe-export --precision int8|int4|fp8` for the onnx target: a quantised export directory.

    checkpoint --write_export--> fp32 graphs (staging) --calibration set (coverage-driven)-->
    int8: static Q/DQ + QMoE 8 bit | int4: MatMulNBits + QMoE 4 bit  --validate vs PyTorch fp32--> out

Everything is assembled in a staging directory next to `out` (export.output_dir.staged_output, as for
export_onnx) and moved into place only after validation passed; the fp32 graphs live in a second
temporary directory beside it. fp8 has no onnxruntime CPU kernel: it is refused here and built by
`--target tensorrt` (ModelOpt Q/DQ, calibration/modelopt_qdq.py) for Hopper / Ada / Thor.
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from enum import Enum
from pathlib import Path

from runtime.errors import UserError
from runtime.manifest import MANIFEST_FILE, PARTS, Manifest

from .calibset import CalibConfig, CalibrationSet, select_by_coverage
from .data import SyntheticSpec, load_samples

FP8_REFUSAL = ("--precision fp8 has no onnxruntime CPU kernels; build it with --target tensorrt on a Hopper, "
               "Ada or Thor GPU (FP8 is not available on Jetson Orin: use int8 or int4 there)")


class QuantPrecision(str, Enum):
    INT8 = "int8"
    INT4 = "int4"
    FP8 = "fp8"

    @property
    def needs_calibration(self) -> bool:
        return self is not QuantPrecision.INT4  # int4 is weight-only round-to-nearest


def check_precision(precision: str) -> QuantPrecision:
    try:
        p = QuantPrecision(precision)
    except ValueError:
        raise UserError(f"--precision {precision!r} is not a quantised precision "
                        f"({', '.join(q.value for q in QuantPrecision)})") from None
    if p is QuantPrecision.FP8:
        raise UserError(FP8_REFUSAL)
    return p


def export_quantized(model: str | Path, out: str | Path, moe_impl="auto", precision: str = "int8",
                     vision_tower: str | None = None, calib_data: str | Path | None = None,
                     calib_min_tokens: int = 32, validate: bool = True, calib: CalibConfig | None = None,
                     synthetic: SyntheticSpec | None = None, pope_per_split: int | None = None) -> Path:
    """Export `model` ('demo' or a checkpoint dir) quantised to `precision` into `out`; returns `out`."""
    from export.moe_lowering import MoEImpl
    from export.onnx_export import Precision, write_export
    from export.output_dir import check_target, staged_output
    from moe_llava.loading import load_pretrained
    p = check_precision(precision)
    out = Path(out)
    check_target(out)
    impl = MoEImpl(moe_impl).resolve("onnx")
    if impl is MoEImpl.PLUGIN:
        raise UserError("--moe-impl plugin graphs need TensorRT: quantise them with --target tensorrt (ModelOpt); "
                        "for onnxruntime use --moe-impl ort or portable")
    loaded = load_pretrained(model, vision_tower)
    # the candidates first: bad --calib-data fails before the (slow) graph export
    samples = load_samples(calib_data, loaded.template, synthetic) if p.needs_calibration else []
    config = calib or CalibConfig(min_tokens=calib_min_tokens)
    with staged_output(out) as staging, tempfile.TemporaryDirectory(prefix=f".{out.name}.fp32.",
                                                                     dir=out.parent) as fp32_dir:
        write_export(loaded, Path(fp32_dir), impl, Precision.FP32)
        calibration = select_by_coverage(loaded, samples, config) if p.needs_calibration else None
        if calibration is not None:
            report_coverage(calibration)
        else:  # weight-only: PyTorch sits idle while quantising, and at the released size it is 12.8 GB
            loaded = _without_weights(loaded)
        quantize_export(Path(fp32_dir), staging, p, calibration)
        if validate:
            loaded = loaded if loaded.model is not None else load_pretrained(model, vision_tower)
            from .validation import validate_quantized
            validate_quantized(loaded, staging, synthetic=synthetic, pope_per_split=pope_per_split)
    return out


def _without_weights(loaded):
    import dataclasses
    import gc
    loaded = dataclasses.replace(loaded, model=None)
    gc.collect()
    return loaded


def calibration_set(loaded, calib_data: str | Path | None = None, min_tokens: int = 32,
                    synthetic: SyntheticSpec | None = None, config: CalibConfig | None = None) -> CalibrationSet:
    """Candidates from --calib-data (default: the synthetic set), kept until every expert has `min_tokens`."""
    calibration = select_by_coverage(loaded, load_samples(calib_data, loaded.template, synthetic),
                                     config or CalibConfig(min_tokens=min_tokens))
    report_coverage(calibration)
    return calibration


def report_coverage(calibration: CalibrationSet) -> None:
    """The coverage table on stderr; a warning line when some expert stayed under the bar."""
    print(calibration.coverage.format(), file=sys.stderr)
    if not calibration.reached:
        below = calibration.coverage.below(calibration.config.min_tokens)
        print(f"warning: {len(below)} experts saw fewer than {calibration.config.min_tokens} calibration tokens "
              f"after {len(calibration.samples)} samples (never fired: {calibration.coverage.never_fired() or 'none'});"
              " add --calib-data or lower --calib-min-tokens", file=sys.stderr)


def quantize_export(fp32_dir: Path, out_dir: Path, precision: QuantPrecision | str,
                    calibration: CalibrationSet | None) -> Manifest:
    """An fp32 export directory -> a quantised one in `out_dir` (graphs, tokenizer, manifest, calibration.json)."""
    from .ort_quant import quantize_int4, quantize_int8
    from .readers import part_feeds
    precision = QuantPrecision(precision)
    source = Manifest.load(fp32_dir)
    if source.precision != "fp32":
        raise UserError(f"{fp32_dir}: quantisation starts from an fp32 export, not {source.precision}")
    if precision.needs_calibration and calibration is None:
        raise UserError(f"--precision {precision.value} needs calibration data")
    out_dir.mkdir(parents=True, exist_ok=True)
    reports = {}
    for part in PARTS:
        src, dst = source.path(part), out_dir / source.parts[part].file
        if precision is QuantPrecision.INT8:
            reports[part] = quantize_int8(src, dst, part_feeds(source, part, calibration.samples)).to_dict()
        else:
            reports[part] = quantize_int4(src, dst).to_dict()
    shutil.copy(source.tokenizer_path, out_dir / source.tokenizer)
    details = {"method": METHODS[precision], "parts": reports,
               "calibration": calibration.summary() if calibration is not None else None}
    _write_manifest(fp32_dir, out_dir, precision, details)
    (out_dir / "calibration.json").write_text(json.dumps(details, indent=1) + "\n")
    return Manifest.load(out_dir)


METHODS = {
    QuantPrecision.INT8: "onnxruntime static Q/DQ (U8U8, per-channel asymmetric weights, MinMax) on "
                         "MatMul/Gemm/Conv; LM head weight-only 8-bit (MatMulNBits); QMoE 8-bit block-wise experts; "
                         "GatherBlockQuantized 8-bit embeddings; routers/norms float",
    QuantPrecision.INT4: "weight-only: MatMulNBits 4-bit (block 32, asymmetric, accuracy_level 4); LM head 8-bit; "
                         "QMoE 4-bit (block 32, accuracy_level 4) experts; GatherBlockQuantized 4-bit embeddings; "
                         "routers/norms float",
}


def _write_manifest(fp32_dir: Path, out_dir: Path, precision: QuantPrecision, details: dict) -> None:
    raw = json.loads((fp32_dir / MANIFEST_FILE).read_text())
    raw["precision"] = precision.value
    raw["quantization"] = {"method": details["method"], "source_precision": "fp32"}
    (out_dir / MANIFEST_FILE).write_text(json.dumps(raw, indent=2) + "\n")
