"""moe-bench on one device for every side: the choice, the CUDA synchronisation and the GPU bandwidth probe.

Both sides always run on the same device, so a speed-up compares libraries, not processors: `auto` takes CUDA
only when every requested backend can use it here; `cuda` refuses with the first backend that cannot.
On CUDA the PyTorch side runs eager fp16 (routers fp32, as the model keeps them) and the temp export is fp16.
"""
from __future__ import annotations

import statistics

from moe_llava.torch_device import choose_torch
from runtime.device import Device, DeviceChoice, choose_onnxruntime, choose_tensorrt

PROBE_MB = 1024  # >> L2 (50 MB on an H100), so the probe measures DRAM


def choose_for(backend: str, requested: Device) -> DeviceChoice:
    if backend == "pytorch":
        return choose_torch(requested)
    if backend == "tensorrt":
        return choose_tensorrt(requested)
    from runtime.ort_engine import import_onnxruntime
    return choose_onnxruntime(requested, import_onnxruntime())


def choose_bench_device(requested: Device, backends: list[str]) -> Device:
    """CPU or CUDA for all of `backends`; raises UserError for cuda (or tensorrt with cpu) when one cannot."""
    if requested is Device.CPU:
        if "tensorrt" in backends:
            choose_tensorrt(Device.CPU)  # raises: TensorRT has no CPU
        return Device.CPU
    choices = [choose_for(b, requested) for b in backends]  # Device.CUDA raises at the first that cannot
    return Device.CUDA if all(c.device is Device.CUDA for c in choices) else Device.CPU


def cuda_sync():
    """A function that waits for the GPU (PyTorch's queue; ONNX Runtime and TensorRT return host arrays, which
    has already waited)."""
    import torch
    return torch.cuda.synchronize


def cuda_bandwidth(repeats: int = 9) -> dict | None:
    """The GPU's DRAM bandwidth as the roofline's `gbs` (device-to-device copy, bytes read + written) and an fp16
    GEMV's read rate, via torch; None without a CUDA build of torch."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    n = PROBE_MB * (1 << 20) // 2
    src, dst = torch.ones(n, dtype=torch.float16, device="cuda"), torch.empty(n, dtype=torch.float16, device="cuda")
    matrix, vector = src.view(-1, 8192), torch.ones(8192, dtype=torch.float16, device="cuda")
    copy_s = _median_seconds(torch, lambda: dst.copy_(src), repeats)
    gemv_s = _median_seconds(torch, lambda: matrix @ vector, repeats)
    out = {"gbs": 2 * src.nbytes / copy_s / 1e9, "gemv_read_gbs": src.nbytes / gemv_s / 1e9,
           "buffer_mb": PROBE_MB, "gpu": torch.cuda.get_device_name(),
           "method": "torch CUDA device-to-device copy (read + written) and fp16 GEMV read, CUDA-event medians"}
    del src, dst, matrix, vector
    torch.cuda.empty_cache()
    return out


def _median_seconds(torch, fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)
