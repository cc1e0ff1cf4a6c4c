"""The accuracy / speed / size table of export directories (README, moe-bench): one row per export.

    rows = precision_table(["exports/fp32", "exports/int8", "exports/int4"])
    print(format_table(rows))

size_mb: the graph files (.onnx + external .data) on disk; size_ratio against the fp32 row when there is
one. greedy_agreement (plain; beside it greedy_agreement_beyond_ties, answers agreeing up to near-tie
divergences) / router_agreement / logit_cosine / POPE F1 come from each directory's validation.json (fp32
exports have no POPE figure of their own: they are token-identical to PyTorch, whose F1 the quantised
reports carry as f1_reference). decode_tokens_per_s: greedy decode steps per second of the onnxruntime
runtime on this machine (prefill of one image + prompt, then DECODE_STEPS greedy steps), prefill_ms
likewise: medians of ROUNDS rounds that measure every export in turn (interleaved_speeds).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

DECODE_STEPS = 32
REPEATS = 3
ROUNDS = 5
PROMPT = "What is in the image?"


def graph_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in Path(directory).iterdir()
               if p.suffix in (".onnx", ".data") and not p.name.startswith("_"))


def read_validation(directory: Path) -> dict:
    path = Path(directory) / "validation.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def measure_speed(directory: Path, threads: int | None = None, image=None, repeats: int = REPEATS) -> dict:
    """Prefill ms and decode tokens/s (best of `repeats`) of the runtime on one synthetic scene and a fixed prompt."""
    from runtime.pipeline import load_pipeline
    image = image if image is not None else _scene()
    best_prefill, best_decode = float("inf"), float("inf")
    with load_pipeline(directory, threads=threads) as pipeline:
        ids = pipeline.prompt_ids(PROMPT, True)
        for _ in range(repeats):
            visual = pipeline.engine.encode_images(pipeline.preprocess(image)[None])[0]
            embeds = pipeline.prompt_embeds(ids, visual)
            start = time.perf_counter()
            token = int(np.argmax(pipeline.engine.prefill(embeds)))
            middle = time.perf_counter()
            for _ in range(DECODE_STEPS):
                token = int(np.argmax(pipeline.engine.decode(token)))
            end = time.perf_counter()
            best_prefill, best_decode = min(best_prefill, middle - start), min(best_decode, end - middle)
    return {"prefill_ms": 1000 * best_prefill, "decode_tokens_per_s": DECODE_STEPS / best_decode,
            "prompt_tokens": len(embeds)}


def interleaved_speeds(export_dirs, threads: int | None = None, rounds: int = ROUNDS) -> list[dict]:
    """measure_speed of every export in turn, `rounds` times (one export loaded at a time); per export the
    median of its rounds - on a shared machine a slow moment then hits every export alike."""
    runs = [[measure_speed(d, threads, repeats=1) for d in export_dirs] for _ in range(rounds)]
    return [{key: float(np.median([r[i][key] for r in runs])) for key in runs[0][i]} for i in range(len(export_dirs))]


def _scene():
    from moe_llava.data import draw_scene, sample_scene
    return draw_scene(sample_scene(np.random.default_rng(0)))


def precision_table(export_dirs, speed: bool = True, threads: int | None = None) -> list[dict]:
    """One row per export directory (see module docstring); fp32 first if present."""
    from runtime.manifest import Manifest
    rows = []
    speeds = interleaved_speeds(export_dirs, threads) if speed else [{} for _ in export_dirs]
    for directory, measured in zip(map(Path, export_dirs), speeds):
        manifest, report = Manifest.load(directory), read_validation(directory)
        pope = report.get("pope") or {}
        row = {"export": str(directory), "precision": manifest.precision, "moe_impl": manifest.moe_impl,
               "size_mb": graph_bytes(directory) / 1e6, "greedy_agreement": report.get("greedy_agreement"),
               "greedy_beyond_ties": report.get("greedy_agreement_beyond_ties"),
               "router_agreement": report.get("router_agreement"),
               "logit_cosine": (report.get("logit_cosine") or {}).get("mean"),
               "pope_f1": pope.get("f1"), "pope_f1_reference": pope.get("f1_reference"),
               "pope_f1_drop_points": pope.get("f1_drop_points")}
        row.update(measured)
        rows.append(row)
    fp32 = next((r for r in rows if r["precision"] == "fp32"), None)
    for row in rows:
        row["size_ratio"] = row["size_mb"] / fp32["size_mb"] if fp32 else None
    return sorted(rows, key=lambda r: r["precision"] != "fp32")


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: list[dict]) -> str:
    """Markdown: precision | size | vs fp32 | greedy (plain; up to near-ties) | router | logit cos | POPE F1 (drop) |
    decode tok/s | prefill."""
    lines = ["| precision | MoE | size MB | vs fp32 | greedy agreement (up to near-ties) | router agreement | "
             "logit cosine | POPE F1 (drop, points) | decode tok/s | prefill ms |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pope = "-" if r["pope_f1"] is None else f"{r['pope_f1']:.3f} ({r['pope_f1_drop_points']:+.1f})"
        greedy = _fmt(r["greedy_agreement"], ".3f")
        if r.get("greedy_beyond_ties") is not None:
            greedy += f" ({r['greedy_beyond_ties']:.3f})"
        lines.append(f"| {r['precision']} | {r['moe_impl']} | {r['size_mb']:.2f} | {_fmt(r['size_ratio'], '.2f')} | "
                     f"{greedy} | {_fmt(r['router_agreement'], '.3f')} | "
                     f"{_fmt(r['logit_cosine'], '.4f')} | {pope} | {_fmt(r.get('decode_tokens_per_s'), '.1f')} | "
                     f"{_fmt(r.get('prefill_ms'), '.1f')} |")
    return "\n".join(lines)
