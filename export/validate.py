"""validation.json: every export checked against the PyTorch model it came from.

The figures (export/compare.py): max abs error per part, router top-k agreement, greedy agreement. The
export fails, with the figures in the message, when a tolerance below is exceeded.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from moe_llava.loading import LoadedModel
from runtime.errors import UserError
from runtime.manifest import Manifest

from .compare import Tolerance, greedy_agreement, part_errors, router_agreement, sample_images

TOLERANCES = {"fp32": Tolerance(1e-4, 1e-4, 0.99, 0.9), "fp16": Tolerance(5e-2, 5e-2, 0.9, 0.5),
              # quantised exports: greedy agreement is gated in calibration/validation.py (with logit cosine and
              # POPE) only for models that can answer at all - a random tiny model's near-tied logits flip anyway
              "int8": Tolerance(5e-2, 0.25, 0.9, 0.0), "int4": Tolerance(0.1, 0.5, 0.85, 0.0)}
# a float export with an int8 KV cache (--kv-cache int8): per-channel int8 keys/values move the logits like fp16
# does (tiny StableLM / Phi-2 / Qwen-1, fp32: max abs error 0.03-0.06 at |logits| ~3, router agreement >= 0.97);
# greedy agreement is not gated, as for the quantised exports: a random tiny model's near-tied logits flip
KV_INT8_TOLERANCE = Tolerance(5e-2, 5e-2, 0.9, 0.0)


def tolerance_for(manifest: Manifest) -> Tolerance:
    if manifest.kv_cache == "int8" and manifest.precision in ("fp32", "fp16"):
        return KV_INT8_TOLERANCE
    return TOLERANCES[manifest.precision]


def validate_export(loaded: LoadedModel, directory: Path, max_new_tokens: int = 12) -> dict:
    """Compare the export in `directory` with PyTorch; write validation.json; raise when out of tolerance."""
    if Manifest.load(directory).moe_impl == "plugin":  # no TensorRT here: run the equivalent ORT graph
        import tempfile
        from .plugin_swap import ort_equivalent_dir
        with tempfile.TemporaryDirectory() as tmp:
            report = compare(loaded, ort_equivalent_dir(directory, Path(tmp)), max_new_tokens)
        report["validated_with"] = "plugin nodes swapped for the equivalent com.microsoft.MoE (onnxruntime CPU)"
    else:
        report = compare(loaded, directory, max_new_tokens)
    (directory / "validation.json").write_text(json.dumps(report, indent=2) + "\n")
    if report["failures"]:
        raise UserError("export failed validation against PyTorch: " + "; ".join(report["failures"]))
    return report


def compare(loaded: LoadedModel, directory: Path, max_new_tokens: int) -> dict:
    manifest = Manifest.load(directory)
    tol = tolerance_for(manifest)
    samples = sample_images(loaded)
    pixels = np.stack([loaded.image_processor(img) for img in samples])
    parts = part_errors(loaded, directory, pixels, tol)
    router = router_agreement(loaded, directory, pixels[:1])
    greedy, answers = greedy_agreement(loaded, directory, samples, max_new_tokens)
    failures = tolerance_failures(parts, router, greedy, tol)
    return {"precision": manifest.precision, "moe_impl": manifest.moe_impl, "kv_cache": manifest.kv_cache,
            "parts": parts,
            "router_agreement": router, "greedy_agreement": greedy, "samples": answers,
            "tolerance": asdict(tol), "passed": not failures, "failures": failures}


def tolerance_failures(parts: dict, router: float, greedy: float, tol: Tolerance) -> list[str]:
    failures = [f"{name}: max abs error {e['max_abs_error']:.3g} > {e['limit']:.3g}"
                for name, e in parts.items() if e["max_abs_error"] > e["limit"]]
    if router < tol.router_agreement:
        failures.append(f"router top-k agreement {router:.3f} < {tol.router_agreement}")
    if greedy < tol.greedy_agreement:
        failures.append(f"greedy agreement {greedy:.3f} < {tol.greedy_agreement}")
    return failures
