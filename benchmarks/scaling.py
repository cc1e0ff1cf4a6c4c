"""The scaling study: E in {4, 8, 16} experts at k=2 with equal ACTIVE size, decode and prefill per backend.

One random StableLM-shaped checkpoint per E (benchmarks.synthetic: H, I, L, V fixed, so a token uses the
same number of parameters whatever E is), exported with com.microsoft.MoE. All workers - every E, every backend
- are measured in one interleaved loop, so drift cannot masquerade as an E effect. The paper's promise: decode
cost follows active parameters, i.e. the decode-time ratio E=16 / E=4 stays near 1 while total parameters grow.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from .measure import WorkerSpec, measure_interleaved
from .report import log as _log
from .report import progress as _progress
from .roofline import decode_weight_bytes
from .synthetic import Preset, synthetic_config, write_synthetic_checkpoint

PROMPT = "Describe the picture briefly."


def run_scaling(experts: list[int], preset: Preset | str, backends: list[str], threads: int, runs: int,
                warmup: int, new_tokens: int, top_k: int = 2, prompt: str = PROMPT,
                work_dir: str | Path | None = None) -> dict:
    """`work_dir`: keep the checkpoints and exports there and reuse them next time (default: a temp dir)."""
    preset = Preset(preset)
    with tempfile.TemporaryDirectory(prefix="moe-bench-scaling-") as tmp:
        root = Path(work_dir) if work_dir else Path(tmp)
        specs, sizes = {}, {}
        for e in experts:
            sources = _prepare(root / f"{preset.value}-e{e}-k{top_k}", preset, e, top_k, backends)
            for backend in backends:
                specs[f"E{e}/{backend}"] = WorkerSpec(backend, str(sources[backend]), prompt, new_tokens, threads)
            sizes[e] = decode_weight_bytes(synthetic_config(preset, e, top_k))
        _log(f"measuring {len(specs)} processes, {warmup} + {runs} interleaved rounds")
        results = measure_interleaved(specs, warmup, runs, _progress)
    points = [_point(e, sizes[e], {_side(b): results[f"E{e}/{b}"] for b in backends}) for e in experts]
    return {"preset": preset.value, "top_k": top_k, "runs": runs, "warmup": warmup, "threads": threads,
            "decode_steps": new_tokens - 1, "prompt_tokens": next(iter(results.values()))["prompt_tokens"],
            "points": points, "ratios": _ratios(points, [_side(b) for b in backends])}


def _prepare(directory: Path, preset: Preset, experts: int, top_k: int, backends: list[str]) -> dict[str, Path]:
    """Checkpoint (+ export) of one E; what a previous run left in `directory` is reused."""
    checkpoint, engine = directory / "checkpoint", directory / "onnx"
    if not (checkpoint / "config.json").is_file():
        _log(f"writing a random {preset.value} checkpoint with E={experts}")
        write_synthetic_checkpoint(checkpoint, preset, experts, top_k)
    sources = {"pytorch": checkpoint}
    if "onnxruntime" in backends:
        if not (engine / "manifest.json").is_file():
            from export.onnx_export import export_onnx
            _log(f"exporting the E={experts} model (com.microsoft.MoE)")
            export_onnx(checkpoint, engine, "ort", "fp32", validate=False)
        sources["onnxruntime"] = engine
    return sources


def _side(backend: str) -> str:
    return "pytorch" if backend == "pytorch" else "runtime"


def _point(experts: int, size, sides: dict[str, dict]) -> dict:
    keep = ("decode_ms_per_token", "decode_tok_s", "prefill_ms", "ttft_ms", "peak_rss_mb", "spread")
    return {"experts": experts, "params_total": size.params_total, "params_active": size.params_active,
            "weight_bytes_per_token": size.total,
            **{side: {k: r[k] for k in keep} for side, r in sides.items()}}


def _ratios(points: list[dict], sides: list[str]) -> dict:
    lo, hi = points[0], points[-1]
    out = {"experts": [lo["experts"], hi["experts"]], "params_total": hi["params_total"] / lo["params_total"]}
    for side in sides:
        out[side] = {"decode": hi[side]["decode_ms_per_token"] / lo[side]["decode_ms_per_token"],
                     "prefill": hi[side]["prefill_ms"] / lo[side]["prefill_ms"]}
    return out
