"""One GroupQueryAttention node on onnxruntime's CPU kernel, per KV-cache type: decode growth and prefill.

    python benchmarks/gqa_cache_types.py [--heads 8] [--head-dim 64] [--rounds 15] [--cold] [--json F]

The node as the fused decoder holds it (packed fp32 qkv, rotary inside, one shared [1,KVH,1024,D] buffer
written in place), with the cache stored as
  fp32         the float export's cache
  fp16/fp32q   an fp16 cache under fp32 q/k/v (the op's T and T_CACHE differ)
  fp16         q/k/v and cache all fp16 (what casting around the op gives)
  int8         int8 cache, per-channel scales (`moe-export --kv-cache int8`)
  int8/tensor  int8 cache, one scale per tensor
Reported per layer, CPU time of the calling thread (1 intra-op thread), medians over interleaved rounds:
decode@64 and decode@960 (one new position after n cached), their difference (what 896 more cached positions
cost), and prefill@700 (700 positions into an empty cache). --cold streams 200 MB between calls, as the
decoder's weights do between two layers, so the cache is read from memory rather than from the CPU caches.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BUFFER, ROTARY_HALF = 1024, 16
PREFILL = 700
# name -> (q/k/v dtype, cache dtype, quantisation)
CACHES = {"fp32": ("float32", "float32", None), "fp16/fp32q": ("float32", "float16", None),
          "fp16": ("float16", "float16", None), "int8": ("float32", "int8", "PER_CHANNEL"),
          "int8/tensor": ("float32", "int8", "PER_TENSOR")}


def node_model(heads: int, head_dim: int, dtype: str, cache: str, quant: str | None) -> bytes:
    from onnx import helper
    from onnx.helper import np_dtype_to_tensor_dtype as onnx_type
    t, c = onnx_type(np.dtype(dtype)), onnx_type(np.dtype(cache))
    info = helper.make_tensor_value_info
    inputs = [info("qkv", t, [1, None, 3 * heads * head_dim]), info("past_key", c, [1, heads, BUFFER, head_dim]),
              info("past_value", c, [1, heads, BUFFER, head_dim]), info("seqlens_k", 6, [1]), info("total", 6, []),
              info("cos", t, [BUFFER, ROTARY_HALF]), info("sin", t, [BUFFER, ROTARY_HALF]),
              info("position_ids", 7, [1, None])]
    names = ["qkv", "", "", "past_key", "past_value", "seqlens_k", "total", "cos", "sin", "position_ids"]
    quantised = {}
    if quant:
        inputs += [info("k_scale", 1, None), info("v_scale", 1, None)]
        names += ["", "", "k_scale", "v_scale"]
        quantised = dict(k_quant_type=quant, v_quant_type=quant, kv_cache_bit_width=8)
    outputs = [info("out", t, None), info("present_key", c, None), info("present_value", c, None)]
    node = helper.make_node("GroupQueryAttention", names, ["out", "present_key", "present_value"],
                            domain="com.microsoft", num_heads=heads, kv_num_heads=heads, do_rotary=1,
                            rotary_interleaved=0, **quantised)
    graph = helper.make_graph([node], "gqa", inputs, outputs)
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


class NodeRun:
    """One session and its buffers; run(n, s) times s new positions after n cached (CPU time, seconds)."""

    def __init__(self, ort, heads: int, head_dim: int, name: str, rng):
        dtype, cache, quant = CACHES[name]
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(node_model(heads, head_dim, dtype, cache, quant), options,
                                            providers=["CPUExecutionProvider"])
        shape = (1, heads, BUFFER, head_dim)
        self.key, self.value = (np.zeros(shape, cache) for _ in range(2))
        self.qkv = rng.standard_normal((1, PREFILL, 3 * heads * head_dim)).astype(dtype)
        angles = rng.uniform(0, np.pi, (BUFFER, ROTARY_HALF))
        self.fixed = {"cos": np.cos(angles).astype(dtype), "sin": np.sin(angles).astype(dtype)}
        if quant:
            scale = np.full((1, heads, 1, head_dim) if quant == "PER_CHANNEL" else (1,), 0.03, np.float32)
            self.fixed.update(k_scale=scale, v_scale=scale)
        self.out = np.empty((1, PREFILL, heads * head_dim), dtype)
        self.run(0, PREFILL)  # fill the cache with values of the right magnitude

    def run(self, cached: int, new: int) -> float:
        binding = self.session.io_binding()
        feed = dict(qkv=self.qkv[:, :new], past_key=self.key, past_value=self.value,
                    seqlens_k=np.array([cached + new - 1], np.int32), total=np.array(cached + new, np.int32),
                    position_ids=np.arange(cached, cached + new)[None], **self.fixed)
        for name, array in feed.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        out = self.out[:, :new]
        for name, array in (("out", out), ("present_key", self.key), ("present_value", self.value)):
            binding.bind_output(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
        start = time.thread_time()
        self.session.run_with_iobinding(binding)
        return time.thread_time() - start


def measure(heads: int, head_dim: int, rounds: int, cold: bool) -> dict[str, dict[str, float]]:
    from runtime.ort_engine import import_onnxruntime
    ort, rng = import_onnxruntime(), np.random.default_rng(0)
    runs = {name: NodeRun(ort, heads, head_dim, name, rng) for name in CACHES}
    flush = np.ones(50_000_000, np.float32)  # 200 MB
    cases = {"decode@64": (64, 1), "decode@960": (960, 1), f"prefill@{PREFILL}": (0, PREFILL)}
    samples = {name: {case: [] for case in cases} for name in CACHES}
    for _ in range(1 + rounds):  # the first round warms up and is dropped
        for case, (cached, new) in cases.items():
            for name, run in runs.items():
                if cold:
                    flush.sum()
                samples[name][case].append(run.run(cached, new) * 1e6)
    medians = {name: {case: statistics.median(v[1:]) for case, v in per.items()} for name, per in samples.items()}
    for m in medians.values():
        m["growth 64->960"] = m["decode@960"] - m["decode@64"]
    return medians


def table(medians: dict) -> str:
    cases = list(next(iter(medians.values())))
    lines = ["| cache | " + " | ".join(f"{c} us" for c in cases) + " |", "|---" * (len(cases) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{m[c]:.0f}" for c in cases) + " |" for name, m in medians.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", type=int, default=8, help="query = kv heads (the small preset: 8)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--cold", action="store_true", help="stream 200 MB before every call")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    medians = measure(args.heads, args.head_dim, args.rounds, args.cold)
    print(table(medians))
    if args.json:
        args.json.write_text(json.dumps({"cold": args.cold, "medians_us": medians}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
