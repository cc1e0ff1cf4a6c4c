"""`--precision int4` for TensorRT: checkpoint -> fp16 plugin export -> INT4 weight-only graphs (trt_int4.py),
validated in onnxruntime against PyTorch fp32.

    moe-export --target tensorrt --precision int4 --model DIR --out OUT    (exports, then builds engines)
    moe-export --target onnx --moe-impl plugin --precision int4 --model DIR --out OUT   (graphs only; build them
                                                                   on the device with --target tensorrt --from-onnx)

The graphs are fp16 (the plugin's INT4 experts take fp16 activations) with INT4 weights; validation runs the
plugin nodes as onnxruntime's QMoE on the same codes (export/plugin_swap.py with qmoe_twin) and applies the int4 gates of
calibration/validation.py (logit cosine, router agreement, POPE). OUT is staged: a failure leaves nothing.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from runtime.manifest import MANIFEST_FILE, Manifest

from export.output_dir import staged_output
from .trt_int4 import GROUP_SIZES, qmoe_twin, quantize_for_tensorrt

QUANTISED_PARTS = ("vision", "projector", "decoder")  # embed stays an fp16 Gather table
METHOD = (f"TensorRT weight-only, round-to-nearest, symmetric: MoE experts INT4 in the MoELlavaMoE plugin "
          f"(weight_bits 4, fp16 group scales), dense MatMuls INT4 DequantizeLinear blocks (group "
          f"{'/'.join(map(str, GROUP_SIZES))}, largest dividing K), LM head INT8 per channel; routers fp32, "
          f"embeddings and activations fp16")


def export_int4_for_tensorrt(loaded, out: Path, validate: bool = True, synthetic=None,
                             pope_per_split: int | None = None) -> Path:
    """The INT4 TensorRT graphs of `loaded` (a LoadedModel) in `out`; returns `out`."""
    from export.moe_lowering import MoEImpl
    from export.onnx_export import Precision, write_export
    out = Path(out)
    with staged_output(out) as staging, tempfile.TemporaryDirectory(prefix=f".{out.name}.fp16.",
                                                                     dir=out.parent) as fp16_dir:
        write_export(loaded, Path(fp16_dir), MoEImpl.PLUGIN, Precision.FP16)
        int4_export_dir(Path(fp16_dir), staging)
        if validate:
            validate_int4(loaded, staging, synthetic, pope_per_split)
    return out


def int4_export_dir(fp16_dir: Path, out_dir: Path) -> Manifest:
    """An fp16 plugin export directory -> the INT4 one in `out_dir` (graphs, embed, tokenizer, manifest)."""
    from .part_io import load, save
    source = Manifest.load(fp16_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reports = {}
    for part in QUANTISED_PARTS:
        model = load(source.path(part))
        reports[part] = quantize_for_tensorrt(model).to_dict()
        save(model, out_dir / source.parts[part].file)
    for name in (source.parts["embed"].file, source.tokenizer):
        shutil.copy(fp16_dir / name, out_dir / name)
    raw = json.loads((fp16_dir / MANIFEST_FILE).read_text())
    raw["precision"] = "int4"
    raw["quantization"] = {"method": METHOD, "source_precision": "fp16", "parts": reports}
    (out_dir / MANIFEST_FILE).write_text(json.dumps(raw, indent=2) + "\n")
    return Manifest.load(out_dir)


def validate_int4(loaded, directory: Path, synthetic=None, pope_per_split: int | None = None) -> dict:
    """calibration/validation.py's int4 report for `directory`, run on its onnxruntime twin; validation.json
    lands in `directory`. Raises (UserError) when a gate fails."""
    from export.plugin_swap import ort_equivalent_dir

    from .validation import validate_quantized
    with tempfile.TemporaryDirectory() as tmp:
        twin = ort_equivalent_dir(directory, Path(tmp), int4_node=qmoe_twin)
        report = validate_quantized(loaded, twin, synthetic=synthetic, pope_per_split=pope_per_split)
    report["validated_with"] = ("plugin nodes swapped for com.microsoft.QMoE on the same INT4 codes "
                                "(onnxruntime CPU)")
    (directory / "validation.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
