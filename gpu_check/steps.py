"""The gpu-check steps in run order, the slow sanitizers last so they cannot starve the others. Each runs in its own
subprocess (gpu_check.worker) under its time limit."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    name: str
    target: str  # "module:function" returning (summary, figures) or raising StepFailed
    timeout_s: float  # wall-clock limit of the step's subprocess
    what: str


STEPS = [
    Step("kernels", "gpu_check.kernels:run", 300, "plugin kernel sweep: tests/plugins/test_*_gpu.py against PyTorch"),
    Step("lifecycle", "gpu_check.lifecycle:run", 240,
         "real IPluginV3 through TensorRT's life cycle: aligned, misaligned, CUDA-graph enqueues vs reference"),
    Step("cuda-helpers", "gpu_check.cuda_helpers:run", 90, "the TensorRT backend's cuda-bindings Cuda wrapper"),
    Step("moe-timing", "gpu_check.moe_timing:run", 240,
         "plugin MoE layer vs PyTorch MoELayer, StableLM shape, T=1 and 577, GB/s"),
    Step("memcheck", "gpu_check.lifecycle:run_memcheck", 200, "the lifecycle driver under compute-sanitizer memcheck"),
    Step("racecheck", "gpu_check.lifecycle:run_racecheck", 240,
         "the lifecycle driver under compute-sanitizer racecheck"),
    Step("bench-cuda", "gpu_check.bench_cuda:run", 180,
         "moe-bench --device cuda on the demo model (PyTorch fp16; ONNX Runtime CUDA where onnxruntime-gpu is)"),
]
BY_NAME = {s.name: s for s in STEPS}
