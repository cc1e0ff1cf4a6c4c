"""Where a decode step's time goes: onnxruntime's profiler on the decoder of one or more exports.

    python benchmarks/ort_profile.py --engine-dir EXPORT[,EXPORT...] [--steps 16] [--threads 1] [--top 6]

For each export: one prefill of the bench prompt (synthetic scene + "What is in the image?"), then --steps
greedy decode steps through the runtime (runtime.ort_engine, the session options moe-run uses, with
onnxruntime's profiling switched on for decoder.onnx). Node events are summed by op type, separately for
the prefill run and the decode runs (medians over the decode runs); prints a markdown table per phase:
the run time, the time inside nodes, and the top op types' share of the node time. The rest of a run is
onnxruntime's per-run work outside kernels (binding, allocation, scheduling; on a shared machine also
time the thread was descheduled).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def profile_export(directory: Path, steps: int, threads: int, prefix: str) -> Path:
    """Run prefill + `steps` decode steps with decoder profiling on; returns the profile JSON path."""
    from runtime import ort_engine
    from runtime.pipeline import load_pipeline
    plain = ort_engine._options

    def profiled(ort, part, n):
        options = plain(ort, part, n)
        if part == "decoder":
            options.enable_profiling, options.profile_file_prefix = True, prefix
        return options
    ort_engine._options = profiled
    try:
        with load_pipeline(directory, threads=threads) as pipeline:
            from calibration.report import PROMPT, _scene
            visual = pipeline.engine.encode_images(pipeline.preprocess(_scene())[None])[0]
            token = int(np.argmax(pipeline.engine.prefill(pipeline.prompt_embeds(pipeline.prompt_ids(PROMPT, True),
                                                                                  visual))))
            for _ in range(steps):
                token = int(np.argmax(pipeline.engine.decode(token)))
            return Path(pipeline.engine.sessions["decoder"].session.end_profiling())
    finally:
        ort_engine._options = plain


def op_times(profile: Path) -> dict[str, dict]:
    """{"prefill"|"decode": {"runs": n, "run_ms": median run, "ops": {op type: median ms per run}}}.

    Medians over the decode runs, not means: on a shared machine a descheduled moment lands on whichever
    op was running and would dominate a mean."""
    events = json.loads(profile.read_text())
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    nodes = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    out = {}
    for phase, chosen in {"prefill": runs[:1], "decode": runs[1:]}.items():
        per_run = [_run_ops(run, nodes) for run in chosen]
        names = {op for ops in per_run for op in ops}
        ops = {op: float(np.median([r.get(op, 0.0) for r in per_run])) for op in names}
        run_ms = float(np.median([r["dur"] / 1000 for r in chosen]))
        ops["(outside nodes)"] = max(run_ms - sum(ops.values()), 0.0)
        out[phase] = {"runs": len(chosen), "run_ms": run_ms, "ops": ops}
    return out


def _run_ops(run: dict, nodes: list[dict]) -> dict[str, float]:
    ops: dict[str, float] = defaultdict(float)
    for e in nodes:
        if run["ts"] <= e["ts"] <= run["ts"] + run["dur"]:
            ops[e["args"]["op_name"]] += e["dur"] / 1000
    return ops


def table(results: dict[str, dict], top: int) -> str:
    lines = ["| export | phase | ms per run | in nodes | top op types (share of the node time, ms) |",
             "|---|---|---|---|---|"]
    for name, phases in results.items():
        for phase, figures in phases.items():
            ops = {op: ms for op, ms in figures["ops"].items() if op != "(outside nodes)"}
            total = sum(ops.values())
            ranked = sorted(ops.items(), key=lambda kv: -kv[1])[:top]
            cells = ", ".join(f"{op} {100 * ms / total:.0f} % ({ms:.2f})" for op, ms in ranked)
            lines.append(f"| {name} | {phase} | {figures['run_ms']:.2f} | {total:.2f} | {cells} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--engine-dir", required=True, help="comma-separated export directories")
    p.add_argument("--steps", type=int, default=16, help="decode steps after the prefill")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--top", type=int, default=6, help="op types listed per phase")
    p.add_argument("--json", help="write the per-op figures here")
    args = p.parse_args(argv)
    from runtime.manifest import Manifest
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for directory in map(Path, args.engine_dir.split(",")):
            label = f"{Manifest.load(directory).precision} ({directory.name})"
            profile = profile_export(directory, args.steps, args.threads, str(Path(tmp) / directory.name))
            results[label] = op_times(profile)
    print(table(results, args.top))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    from runtime.errors import run_guarded
    sys.exit(run_guarded(main))  # a path that is not an export / checkpoint: one line, no traceback
