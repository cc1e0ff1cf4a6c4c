"""One weight MatMul at decode (M=1) and prefill (M=64) shapes: fp32 against onnxruntime's MatMulNBits at
8 / 4 bits, block 32 / 128, accuracy_level 0 (float activations) / 4 (int8 activations). 1 thread, ms,
median of --reps runs. The figures behind calibration/weight_only.py's choice of kernels.

    python benchmarks/quant_kernels.py [--shapes 512x8192,2048x8192] [--reps 40]
"""
from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SETTINGS = [(bits, block, level) for bits in (8, 4) for block in (32, 128) for level in (0, 4)]


def matmul_graph(k: int, n: int, m: int) -> onnx.ModelProto:
    weight = (np.random.default_rng(0).normal(size=(k, n)) * 0.02).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "mm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
                              [numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def quantized(model: onnx.ModelProto, bits: int, block: int, level: int) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block, is_symmetric=True,
                                     accuracy_level=level or None)
    quantizer.process()
    return quantizer.model.model


def time_ms(model: onnx.ModelProto, k: int, m: int, reps: int) -> float:
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).normal(size=(m, k)).astype(np.float32)
    for _ in range(3):
        session.run(None, {"x": x})
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        session.run(None, {"x": x})
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="512x8192,2048x8192", help="K x N pairs, comma-separated")
    p.add_argument("--rows", default="1,64", help="M values (1 = a decode step)")
    p.add_argument("--reps", type=int, default=40)
    args = p.parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)
    header = " | ".join(f"{b}b/{blk} acc{lvl}" for b, blk, lvl in SETTINGS)
    print(f"| K x N | M | fp32 | {header} |\n|" + "---|" * (3 + len(SETTINGS)))
    for shape in args.shapes.split(","):
        k, n = map(int, shape.split("x"))
        for m in map(int, args.rows.split(",")):
            cells = [time_ms(matmul_graph(k, n, m), k, m, args.reps)]
            cells += [time_ms(quantized(matmul_graph(k, n, m), *s), k, m, args.reps) for s in SETTINGS]
            print(f"| {k} x {n} | {m} | " + " | ".join(f"{c:.2f}" for c in cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
