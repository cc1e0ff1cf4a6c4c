"""Fused vs unfused decoder attention (and the fused graph with an int8 KV cache) through the runtime's engine:
decode cost against cache length, prefill.

    python benchmarks/fused_attention.py [--preset small|300m] [--checkpoint DIR] [--work-dir DIR] [--runs 5]
        [--threads 1] [--json F]

The three graphs (`moe-export --attention fused`, `--attention fused --kv-cache int8` and `--attention unfused`,
fp32, --moe-impl ort) of one checkpoint (a random bench-preset one unless --checkpoint is given; int8 scales
calibrated on it as moe-export does) are loaded side by side in this process as OrtEngines
and measured in interleaved rounds, so machine load hits both alike; medians over the rounds are reported, as
CPU time of the calling thread (with --threads 1 onnxruntime computes on it: the figure a loaded machine leaves
least distorted - on a shared 2-core VM the wall clock is mostly time spent waiting for a core) and wall time:
  decode@n   ms per token for `--decode-tokens` greedy steps after a prefill of n positions (n = 64 and 960)
  prefill@P  ms for one prefill of P = 700 positions (a released model's image + prompt length)
plus the ratios the fused graphs are judged by: decode@960 / decode@64 per graph, fused / unfused at 960 and at
the prefill, and the KV-cache bytes per decode token at 960: the unfused graph's Concat reads and writes the
cache and its attention reads it; the fused graphs' attention reads it once (fp32, or int8).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.synthetic import Preset  # noqa: E402

# graph name -> (attention, kv cache)
GRAPHS = {"fused": ("fused", "float"), "fused-int8kv": ("fused", "int8"), "unfused": ("unfused", "float")}
BASELINES = ("unfused", "fused")  # every other graph is also given as a ratio to these, where measured


def prepare(checkpoint: Path | None, preset: str, work: Path, graphs: list[str]) -> dict[str, Path]:
    """The exports of `graphs` (reused when `work` already holds them)."""
    from benchmarks.synthetic import write_synthetic_checkpoint
    from export.onnx_export import export_onnx
    if checkpoint is None:
        checkpoint = work / f"{preset}-checkpoint"
        if not (checkpoint / "config.json").is_file():
            write_synthetic_checkpoint(checkpoint, preset, 4)
    dirs = {g: work / f"{checkpoint.name}-{g}" for g in graphs}
    for graph, out in dirs.items():
        if not (out / "manifest.json").is_file():
            attention, kv_cache = GRAPHS[graph]
            print(f"exporting {checkpoint} with --attention {attention} --kv-cache {kv_cache}", file=sys.stderr)
            export_onnx(checkpoint, out, "ort", "fp32", validate=False, attention=attention, kv_cache=kv_cache)
    return dirs


CLOCKS = {"cpu": time.thread_time, "wall": time.perf_counter}


def _timed(run, repeat: int = 1) -> dict[str, float]:
    """ms per call of run() on each clock."""
    start = {name: clock() for name, clock in CLOCKS.items()}
    for i in range(repeat):
        run(i)
    return {name: (clock() - start[name]) * 1e3 / repeat for name, clock in CLOCKS.items()}


def time_decode(engine, prefix: np.ndarray, tokens: int) -> dict[str, float]:
    """ms per token of `tokens` decode steps after prefilling `prefix` [n,H]."""
    engine.prefill(prefix)
    return _timed(lambda i: engine.decode(1 + i), tokens)


def time_prefill(engine, embeds: np.ndarray) -> dict[str, float]:
    return _timed(lambda _: engine.prefill(embeds))


def measure(dirs: dict[str, Path], positions: tuple[int, int], prefill: int, decode_tokens: int, runs: int,
            threads: int) -> dict[str, dict[str, dict[str, float]]]:
    """{clock: {graph: {case: median ms}}}"""
    from runtime.ort_engine import OrtEngine
    engines = {g: OrtEngine(d, threads=threads) for g, d in dirs.items()}
    hidden = next(iter(engines.values())).hidden_size
    rng = np.random.default_rng(0)
    embeds = rng.standard_normal((max(*positions, prefill), hidden)).astype(np.float32) * 0.02
    cases = {f"decode@{n}": (lambda e, n=n: time_decode(e, embeds[:n], decode_tokens)) for n in positions}
    cases[f"prefill@{prefill}"] = lambda e: time_prefill(e, embeds[:prefill])
    samples = {g: {c: [] for c in cases} for g in engines}
    for _ in range(1 + runs):  # the first round warms up and is dropped
        for case, run in cases.items():
            for graph in engines:
                samples[graph][case].append(run(engines[graph]))
        print(".", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return {clock: {g: {c: statistics.median(t[clock] for t in v[1:]) for c, v in cases_.items()}
                    for g, cases_ in samples.items()} for clock in CLOCKS}


def ratios(medians: dict, positions: tuple[int, int], prefill: int) -> dict:
    lo, hi = (f"decode@{n}" for n in positions)
    out = {"decode_growth": {g: m[hi] / m[lo] for g, m in medians.items()}}
    for base in (b for b in BASELINES if b in medians):
        for case in (hi, f"prefill@{prefill}"):
            out[f"over_{base}_{case}"] = {g: m[case] / medians[base][case] for g, m in medians.items() if g != base}
    return out


def report(medians: dict, positions: tuple[int, int], prefill: int, manifest) -> dict:
    d = manifest.decoder
    elements = d.num_layers * 2 * d.num_kv_heads * d.head_dim * positions[1]  # K+V at n=960
    return {"medians_ms": medians, "ratios": {c: ratios(m, positions, prefill) for c, m in medians.items()},
            # unfused: Concat reads + writes the cache, attention reads it; fused: attention reads it
            f"kv_bytes_per_token_decode@{positions[1]}": {"unfused": 3 * 4 * elements, "fused": 4 * elements,
                                                          "fused-int8kv": elements}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=[Preset.SMALL.value, Preset.B300M.value], default=Preset.SMALL.value)
    p.add_argument("--checkpoint", type=Path, help="checkpoint to export (default: a random --preset one)")
    p.add_argument("--work-dir", type=Path, help="keep checkpoint and exports here and reuse them")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--decode-tokens", type=int, default=8)
    p.add_argument("--graphs", default=",".join(GRAPHS),
                   help=f"comma-separated, of {', '.join(GRAPHS)} (fewer graphs: less memory at 300m)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    graphs = args.graphs.split(",")
    if not graphs or set(graphs) - set(GRAPHS):
        p.error(f"--graphs {args.graphs!r}: choose from {', '.join(GRAPHS)}")
    positions, prefill = (64, 960), 700
    with tempfile.TemporaryDirectory(prefix="fused-attention-") as tmp:
        dirs = prepare(args.checkpoint, args.preset, args.work_dir or Path(tmp), graphs)
        medians = measure(dirs, positions, prefill, args.decode_tokens, args.runs, args.threads)
        from runtime.manifest import Manifest
        result = report(medians, positions, prefill, Manifest.load(next(iter(dirs.values()))))
    result.update(preset=args.preset if args.checkpoint is None else str(args.checkpoint), runs=args.runs,
                  threads=args.threads, decode_tokens=args.decode_tokens)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
