"""Which ops make a decode step slower as the KV cache grows: onnxruntime's profiler at two cache lengths.

    python benchmarks/decode_growth_profile.py --engine-dir EXPORT[,EXPORT...] [--cached 64,960] [--steps 200]
        [--threads 1]

Per export, one OrtEngine per cache length n (the runtime's session options, profiling on for decoder.onnx),
each prefilled with n random embeddings; then decode steps alternate between the engines, each step followed
by keep(n), so every step runs at exactly n cached positions and machine load hits both lengths alike. Node
events are summed by op type per step. The table gives, largest growth first, the median microseconds per
step at each n, their difference, and the difference of the minima (node times are wall clock: on a loaded
machine a descheduled moment inflates whichever op it lands in; the minimum is a step it spared); then the
step's CPU time ratio (thread_time of the calling thread: with 1 thread onnxruntime computes on it) and, for
GroupQueryAttention, the bytes of the extra cached positions and the rate its growth implies.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STEP = "(step, CPU time)"


def profile_lengths(directory: Path, lengths: list[int], steps: int, threads: int, tmp: Path) -> dict:
    """{n: {op type | STEP: [us per step]}} for `steps` decode steps at each cache length n."""
    from runtime import ort_engine
    plain = ort_engine._options
    engines = {}
    for n in lengths:
        def profiled(ort, part, count, n=n):
            options = plain(ort, part, count)
            if part == "decoder":
                options.enable_profiling, options.profile_file_prefix = True, str(tmp / f"n{n}")
            return options
        ort_engine._options = profiled
        try:
            engines[n] = ort_engine.OrtEngine(directory, threads=threads)
        finally:
            ort_engine._options = plain
    rng = np.random.default_rng(0)
    embeds = rng.standard_normal((max(lengths), engines[lengths[0]].hidden_size)).astype(np.float32) * 0.02
    cpu = {n: [] for n in lengths}
    for n, engine in engines.items():
        engine.prefill(embeds[:n])
    for _ in range(steps):
        for n, engine in engines.items():
            start = time.thread_time()
            engine.decode(1)
            cpu[n].append((time.thread_time() - start) * 1e6)
            engine.keep(n)
    out = {}
    for n, engine in engines.items():
        per_step = _ops_per_run(Path(engine.sessions["decoder"].session.end_profiling()))[1:]  # drop the prefill
        out[n] = {op: [s.get(op, 0.0) for s in per_step] for op in {op for s in per_step for op in s}}
        out[n][STEP] = cpu[n]
    return out


def _ops_per_run(profile: Path) -> list[dict[str, float]]:
    events = json.loads(profile.read_text())
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    nodes = sorted((e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")),
                   key=lambda e: e["ts"])
    per_run, i = [], 0
    for run in runs:
        ops: dict[str, float] = defaultdict(float)
        while i < len(nodes) and nodes[i]["ts"] <= run["ts"] + run["dur"]:
            if nodes[i]["ts"] >= run["ts"]:
                ops[nodes[i]["args"]["op_name"]] += nodes[i]["dur"]
            i += 1
        per_run.append(ops)
    return per_run


def summary(samples: dict, manifest, warmup: int = 5) -> dict:
    lo, hi = sorted(samples)
    med = {n: {op: statistics.median(v[warmup:]) for op, v in samples[n].items()} for n in samples}
    low = {n: {op: min(v[warmup:]) for op, v in samples[n].items()} for n in samples}
    ops = sorted(set(med[lo]) | set(med[hi]), key=lambda op: med[lo].get(op, 0) - med[hi].get(op, 0))
    rows = {op: {"lo_us": med[lo].get(op, 0.0), "hi_us": med[hi].get(op, 0.0),
                 "lo_min_us": low[lo].get(op, 0.0), "hi_min_us": low[hi].get(op, 0.0)} for op in ops}
    d = manifest.decoder
    itemsize = manifest.parts["decoder"].input("past_key_values.0.key").np_dtype.itemsize
    read = d.num_layers * 2 * d.num_kv_heads * d.head_dim * itemsize * (hi - lo)  # the extra positions' bytes
    grow = rows.get("GroupQueryAttention")
    extra_us = grow["hi_us"] - grow["lo_us"] if grow else 0.0
    return {"cached": [lo, hi], "ops": rows, "extra_cache_bytes": read,
            "attention_growth_GBps": read / extra_us / 1e3 if extra_us > 0 else None,  # None: unfused graph
            "step_growth": med[hi][STEP] / med[lo][STEP]}


def table(results: dict) -> str:
    lines = []
    for name, r in results.items():
        lo, hi = r["cached"]
        lines += [f"### {name}", f"| op type | us @{lo} | us @{hi} | growth us | growth of the minima us |",
                  "|---|---|---|---|---|"]
        for op, v in r["ops"].items():
            if max(v["lo_us"], v["hi_us"]) >= 10:
                lines.append(f"| {op} | {v['lo_us']:.0f} | {v['hi_us']:.0f} | {v['hi_us'] - v['lo_us']:+.0f} | "
                             f"{v['hi_min_us'] - v['lo_min_us']:+.0f} |")
        rate = r["attention_growth_GBps"]
        lines.append(f"step (CPU time) @{hi} / @{lo}: {r['step_growth']:.3f}" + (
            f"; GroupQueryAttention read the {r['extra_cache_bytes'] / 1e6:.1f} MB of the {hi - lo} extra cached "
            f"positions at {rate:.1f} GB/s" if rate else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--engine-dir", required=True, help="comma-separated export directories")
    p.add_argument("--cached", default="64,960", help="two cache lengths")
    p.add_argument("--steps", type=int, default=200, help="decode steps per length")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    from runtime.errors import UserError
    from runtime.manifest import Manifest
    lengths = sorted(int(n) for n in args.cached.split(","))
    if len(lengths) != 2 or lengths[0] < 1:
        raise UserError(f"--cached {args.cached!r}: give two positive cache lengths, e.g. 64,960")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for directory in map(Path, args.engine_dir.split(",")):
            manifest = Manifest.load(directory)
            samples = profile_lengths(directory, lengths, args.steps, args.threads, Path(tmp))
            results[f"{directory.name} ({manifest.attention}, {manifest.kv_cache} cache)"] = summary(samples, manifest)
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    from runtime.errors import run_guarded
    sys.exit(run_guarded(main))
