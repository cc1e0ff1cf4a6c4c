"""Prefill at the released StableLM-1.6B-4e shape, op by op: onnxruntime's CPU kernels against PyTorch's.

    python benchmarks/prefill_kernels.py [--rows 656,1] [--threads 2] [--reps 5]

One decoder layer's three costly ops at M prompt rows (656 = 576 visual tokens + a short prompt; 1 = a decode
step), each as the exports run it and as `moe-run --model` runs it in PyTorch fp32 eager:
  dense     x[M,2048] @ W[2048,5632]: torch fp32 | MatMul fp32 (fp32 export) | MatMulNBits 4 bit block 128 (int4
            export's dense) | MatMulNBits 8 bit block 32 (int8 export's dense), both accuracy_level 4
  moe       4 SwiGLU experts, top-2, H 2048, I 5632: moe_llava's MoELayer | com.microsoft.MoE fp32 | QMoE 4 bit
            block 64 at accuracy_level 4 (int4 export) and 0 (float activations) | QMoE 8 bit block 64 (int8)
  attention 32 heads x 64, causal: torch scaled_dot_product_attention | GroupQueryAttention with its rotary
            (25 %) writing a 1024-position cache (every export; decode rows read M=656 cached positions)
Wall-clock medians of --reps runs after one warm-up, ms. The figures behind the README's "Where prefill's time
goes" at the released size.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

H, I, E, K, HEADS, HEAD_DIM, CACHE = 2048, 5632, 4, 2, 32, 64, 1024


def median_ms(run, reps: int) -> float:
    run()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def session(ort, model, threads: int):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as moe-run
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def dense(ort, torch, rows: int, threads: int, reps: int) -> dict[str, float]:
    from benchmarks.quant_kernels import matmul_graph
    from calibration.graph import drop_unused_initializers
    from calibration.tensor_io import TensorIO
    from calibration.weight_only import NBits, matmul_nbits
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, H)).astype(np.float32)
    xt, w = torch.from_numpy(x), torch.from_numpy((rng.standard_normal((H, I)) * 0.02).astype(np.float32))
    out = {"torch fp32": median_ms(lambda: xt @ w, reps)}
    for name, spec in (("fp32", None), ("4 bit b128", NBits(4, 128)), ("8 bit b32", NBits(8, 32))):
        model = matmul_graph(H, I, rows)
        if spec:
            assert matmul_nbits(model, {"mm"}, spec, TensorIO(model)) == 1
            drop_unused_initializers(model)
        s = session(ort, model, threads)
        out[name] = median_ms(lambda: s.run(None, {"x": x}), reps)
    return out


def moe(ort, torch, rows: int, threads: int, reps: int) -> dict[str, float]:
    from calibration.qmoe import quantize_moe_experts
    from export.moe_lowering import interleave_rows
    from moe_llava.moe import Activation, MoELayer
    layer = MoELayer(H, I, E, K, Activation.SWIGLU, bias=False).eval()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((rows, H)).astype(np.float32)
    logits = rng.standard_normal((rows, E)).astype(np.float32)
    xt = torch.from_numpy(x)
    with torch.no_grad():
        out = {"torch fp32": median_ms(lambda: layer(xt), reps)}
        fc1 = interleave_rows(layer.fc1_weight.detach()).numpy()
        fc2 = layer.fc2_weight.detach().numpy()
    for name, bits, level in (("fp32", None, 0), ("4 bit acc4", 4, 4), ("4 bit acc0", 4, 0), ("8 bit acc4", 8, 4)):
        model = moe_graph(fc1, fc2)
        if bits:
            quantize_moe_experts(model, bits, 64, level)
        s = session(ort, model, threads)
        out[name] = median_ms(lambda: s.run(None, {"x": x, "logits": logits}), reps)
    return out


def moe_graph(fc1: np.ndarray, fc2: np.ndarray):
    from onnx import helper, numpy_helper
    node = helper.make_node("MoE", ["x", "logits", "fc1", "", "fc2"], ["y"], domain="com.microsoft", k=K,
                            activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=1)
    info = helper.make_tensor_value_info
    graph = helper.make_graph([node], "moe", [info("x", 1, [None, H]), info("logits", 1, [None, E])],
                              [info("y", 1, [None, H])],
                              [numpy_helper.from_array(fc1, "fc1"), numpy_helper.from_array(fc2, "fc2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])


def attention(ort, torch, rows: int, threads: int, reps: int) -> dict[str, float]:
    """Prefill: M rows on an empty cache; decode (M=1): one row after 656 cached positions."""
    from benchmarks.gqa_cache_types import ROTARY_HALF, node_model
    rng = np.random.default_rng(2)
    cached = 0 if rows > 1 else 656
    q, k, v = (torch.from_numpy(rng.standard_normal((1, HEADS, n, HEAD_DIM)).astype(np.float32))
               for n in (rows, rows + cached, rows + cached))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    out = {"torch sdpa": median_ms(lambda: sdpa(q, k, v, is_causal=rows > 1), reps)}
    gqa = session(ort, _Bytes(node_model(HEADS, HEAD_DIM, "float32", "float32", None)), threads)
    key, value = (rng.standard_normal((1, HEADS, CACHE, HEAD_DIM)).astype(np.float32) for _ in range(2))
    angles = rng.uniform(0, np.pi, (CACHE, ROTARY_HALF))
    binding = gqa.io_binding()
    feed = dict(qkv=rng.standard_normal((1, rows, 3 * HEADS * HEAD_DIM)).astype(np.float32), past_key=key,
                past_value=value, seqlens_k=np.array([cached + rows - 1], np.int32),
                total=np.array(cached + rows, np.int32), position_ids=np.arange(cached, cached + rows)[None],
                cos=np.cos(angles).astype(np.float32), sin=np.sin(angles).astype(np.float32))
    for name, array in feed.items():
        binding.bind_cpu_input(name, np.ascontiguousarray(array))
    result = np.empty((1, rows, HEADS * HEAD_DIM), np.float32)
    for name, array in (("out", result), ("present_key", key), ("present_value", value)):  # in place, as moe-run
        binding.bind_output(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
    out["GroupQueryAttention fp32"] = median_ms(lambda: gqa.run_with_iobinding(binding), reps)
    return out


class _Bytes:
    """A serialised model where session() expects a ModelProto."""

    def __init__(self, data: bytes):
        self.data = data

    def SerializeToString(self) -> bytes:  # noqa: N802 - onnx's name
        return self.data


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="656,1", help="M values, comma-separated (1 = a decode step)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)
    import onnxruntime as ort
    import torch
    torch.set_num_threads(args.threads)
    print(f"| op | M | {'PyTorch'} | onnxruntime: ms (x PyTorch's time) |\n|---|---|---|---|")
    for rows in map(int, args.rows.split(",")):
        for op, measure in (("dense", dense), ("moe", moe), ("attention", attention)):
            figures = measure(ort, torch, rows, args.threads, args.reps)
            (ref_name, ref), *rest = figures.items()
            cells = ", ".join(f"{name} {ms:.1f} ({ms / ref:.2f}x)" for name, ms in rest)
            print(f"| {op} | {rows} | {ref_name} {ref:.1f} | {cells} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
