"""Step `bench-cuda`: `moe-bench --device cuda` on the embedded demo model.

PyTorch eager fp16 on the GPU, and the runtime on ONNX Runtime's CUDA provider where onnxruntime-gpu is installed
(else the PyTorch side alone, and the summary says so). The figures are the bench's own JSON.
"""

from __future__ import annotations

import json

from gpu_check.common import BUILD_DIR, StepFailed

ARGS = ["--model", "demo", "--runs", "5", "--warmup", "2", "--max-new-tokens", "16", "--threads", "4"]


def ort_has_cuda() -> bool:
    try:
        import onnxruntime
    except ImportError:
        return False
    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def bench(device: str) -> dict:
    from cli import bench_main

    backends = "pytorch,onnxruntime" if device == "cpu" or ort_has_cuda() else "pytorch"
    out = BUILD_DIR / f"bench-{device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    argv = [*ARGS, "--device", device, "--backends", backends, "--json", str(out)]
    print("moe-bench " + " ".join(argv), flush=True)
    if bench_main(argv) != 0 or not out.is_file():
        raise StepFailed(f"moe-bench {' '.join(argv)} failed (its error is in the log)")
    return json.loads(out.read_text())


def run() -> tuple[str, dict]:
    report = bench("cuda")
    if report["settings"]["device"] != "cuda":
        raise StepFailed(f"moe-bench ran on {report['settings']['device']}, not cuda", report)
    sides = [s for s in ("pytorch", "runtime") if s in report]
    parts = [f"{s}: ttft {report[s]['ttft_ms']:.1f} ms, decode {report[s]['decode_tok_s']:.0f} tok/s" for s in sides]
    if "runtime" not in report:
        parts.append("no onnxruntime-gpu here: the runtime side was not timed")
    return "moe-bench --device cuda on the demo model: " + "; ".join(parts), report
