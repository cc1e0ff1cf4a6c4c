"""`moe-export --precision int8|int4|fp8` for the onnx target: a quantised export directory.

    checkpoint --write_export--> fp32 graphs (staging; 16-bit weights + Cast from a 16-bit checkpoint)
               --weight-only, one tensor at a time (weight_only.py, tensor_io.py)-->
    int8: MatMulNBits 8 bit + QMoE 8 bit | int4: MatMulNBits 4 bit + QMoE 4 bit  --validate vs PyTorch fp32--> out

No calibration data: weights are rounded to nearest, so int8/int4 exports are deterministic. (A calibrated
static Q/DQ int8 - per-tensor uint8 activations - was measured against it and removed: demo model greedy
agreement 0.754 vs weight-only's 0.865 at block 128, same decode speed; see README. Calibration stays for
--target tensorrt, ModelOpt.)

Everything is assembled in a staging directory next to `out` (export.output_dir.staged_output, as for
export_onnx) and moved into place only after validation passed; the fp32 graphs live in a second
temporary directory beside it. fp8 has no onnxruntime CPU kernel: it is refused here and built by
`--target tensorrt` (ModelOpt Q/DQ, calibration/modelopt_qdq.py) for Hopper / Ada / Thor. int4 with
`--moe-impl plugin` writes TensorRT's INT4 weight-only graphs instead (calibration/trt_int4_export.py).
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from export.precision import Precision
from runtime.errors import UserError
from runtime.manifest import MANIFEST_FILE, PARTS, Manifest

from .calibset import CalibConfig, CalibrationSet, select_by_coverage
from .data import SyntheticSpec, load_samples

FP8_REFUSAL = ("--precision fp8 has no onnxruntime CPU kernels; build it with --target tensorrt on a Hopper, "
               "Ada or Thor GPU (FP8 is not available on Jetson Orin: use int8 or int4 there)")


def check_precision(precision: str) -> Precision:
    p = Precision(precision) if precision in {q.value for q in Precision} else None
    if p is None or not p.quantised:
        raise UserError(f"--precision {precision!r} is not a quantised precision "
                        f"({', '.join(q.value for q in Precision if q.quantised)})")
    if p is Precision.FP8:
        raise UserError(FP8_REFUSAL)
    return p


def export_quantized(model: str | Path, out: str | Path, moe_impl="auto", precision: str = "int8",
                     vision_tower: str | None = None, validate: bool = True,
                     synthetic: SyntheticSpec | None = None, pope_per_split: int | None = None,
                     attention: str = "auto", kv_cache: str = "float") -> Path:
    """Export `model` ('demo' or a checkpoint dir) quantised to `precision` into `out`; returns `out`."""
    from export.attention_lowering import AttentionImpl, rotary_dims
    from export.kv_cache_int8 import KVCacheType, quantise_kv_cache
    from export.moe_lowering import MoEImpl
    from export.onnx_export import write_export
    from export.output_dir import check_target, staged_output
    from moe_llava.loading import load_pretrained
    p = check_precision(precision)
    out = Path(out)
    check_target(out)
    impl = MoEImpl(moe_impl).resolve("onnx")
    if impl is MoEImpl.PLUGIN and p is not Precision.INT4:
        raise UserError("--moe-impl plugin graphs need TensorRT: quantise them with --target tensorrt (ModelOpt); "
                        "for onnxruntime use --moe-impl ort or portable")
    attention = AttentionImpl(attention).resolve(impl.value)
    kv_cache = KVCacheType(kv_cache).check(attention.value)
    if impl is MoEImpl.PLUGIN:  # INT4 weight-only graphs for TensorRT (plugin INT4 experts), no calibration
        from .trt_int4_export import export_int4_for_tensorrt
        return export_int4_for_tensorrt(load_pretrained(model, vision_tower), out, validate, synthetic,
                                        pope_per_split)
    # fp32 compute from the checkpoint's own 16-bit weights (moe_llava/upcast.py): the graphs are traced with
    # fp16 initializers + Cast, which the streamed quantiser reads through, and the same model is the fp32
    # reference of validation - a released StableLM-1.6B-4e is held once, in 6.4 GB, from start to end
    loaded = load_pretrained(model, vision_tower, keep_stored=True)
    rotary = rotary_dims(loaded.model.layers[0].self_attn)
    with staged_output(out) as staging, tempfile.TemporaryDirectory(prefix=f".{out.name}.fp32.",
                                                                     dir=out.parent) as fp32_dir:
        write_export(loaded, Path(fp32_dir), impl, Precision.FP32, attention)
        quantize_export(Path(fp32_dir), staging, p)
        if kv_cache is KVCacheType.INT8:
            quantise_kv_cache(Path(fp32_dir), staging, rotary)  # scales from the fp32 graph's cache
        if validate:
            from .validation import validate_quantized
            validate_quantized(loaded, staging, synthetic=synthetic, pope_per_split=pope_per_split)
    return out


def calibration_set(loaded, calib_data: str | Path | None = None, min_tokens: int = 32,
                    synthetic: SyntheticSpec | None = None, config: CalibConfig | None = None) -> CalibrationSet:
    """Candidates from --calib-data (default: the synthetic set), kept until every expert has `min_tokens`
    (ModelOpt Q/DQ for --target tensorrt)."""
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


def quantize_export(fp32_dir: Path, out_dir: Path, precision: Precision | str,
                    plans: dict | None = None) -> Manifest:
    """An fp32 export directory -> a quantised one in `out_dir` (graphs, tokenizer, manifest, calibration.json).

    `plans` {part: WeightOnlyPlan} overrides the precision's plan per part (sensitivity studies)."""
    from .weight_only import PLANS, quantize_weight_only
    precision = check_precision(Precision(precision).value)
    source = Manifest.load(fp32_dir)
    if source.precision != "fp32":
        raise UserError(f"{fp32_dir}: quantisation starts from an fp32 export, not {source.precision}")
    out_dir.mkdir(parents=True, exist_ok=True)
    reports = {}
    for part in PARTS:
        plan = (plans or {}).get(part, PLANS[precision.value])
        reports[part] = quantize_weight_only(source.path(part), out_dir / source.parts[part].file, plan).to_dict()
    shutil.copy(source.tokenizer_path, out_dir / source.tokenizer)
    details = {"method": METHODS[precision], "parts": reports, "calibration": None}
    _write_manifest(fp32_dir, out_dir, precision, details)
    (out_dir / "calibration.json").write_text(json.dumps(details, indent=1) + "\n")
    return Manifest.load(out_dir)


METHODS = {
    Precision.INT8: "weight-only: MatMulNBits 8-bit (block 32, symmetric, accuracy_level 4); LM head "
                         "MatMulNBits 8-bit (block 128, accuracy_level 4); QMoE 8-bit (block 64, accuracy_level 4) "
                         "experts; GatherBlockQuantized 8-bit embeddings (block 128); routers/norms float",
    Precision.INT4: "weight-only: MatMulNBits 4-bit (block 128, symmetric, accuracy_level 4); LM head "
                         "MatMulNBits 8-bit (block 128, accuracy_level 4); QMoE 4-bit (block 64, accuracy_level 4) "
                         "experts; GatherBlockQuantized 4-bit embeddings; routers/norms float",
}


def _write_manifest(fp32_dir: Path, out_dir: Path, precision: Precision, details: dict) -> None:
    raw = json.loads((fp32_dir / MANIFEST_FILE).read_text())
    raw["precision"] = precision.value
    raw["quantization"] = {"method": details["method"], "source_precision": "fp32"}
    (out_dir / MANIFEST_FILE).write_text(json.dumps(raw, indent=2) + "\n")
