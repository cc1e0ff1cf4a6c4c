"""Step `cuda-helpers`: the TensorRT backend's cuda-bindings wrapper (`Cuda`) on a real GPU.

Allocation, blocking and stream-ordered copies through pinned memory, a captured graph replayed after its pinned
source changed, a capture whose enqueue raises (the stream must come out of capture mode), the out-of-memory
message, and close() giving the memory back.
"""

from __future__ import annotations

import numpy as np

from gpu_check.common import StepFailed
from runtime.errors import UserError
from runtime.tensorrt.cuda import Cuda
from runtime.tensorrt.libraries import import_cudart

MIB = 2**20


def expect(cond: bool, what: str, figures: dict) -> None:
    if not cond:
        raise StepFailed(what, figures)


def free_bytes(cuda: Cuda) -> int:
    free, _total = cuda.check(cuda.rt.cudaMemGetInfo(), "cudaMemGetInfo")
    return int(free)


def capturing(cuda: Cuda, stream) -> bool:
    status = cuda.check(cuda.rt.cudaStreamIsCapturing(stream), "cudaStreamIsCapturing")
    return status != cuda.rt.cudaStreamCaptureStatus.cudaStreamCaptureStatusNone


def check_copies(cuda: Cuda, stream, figures: dict) -> None:
    data = np.random.default_rng(0).standard_normal(16 * MIB // 4).astype(np.float32)  # 16 MiB
    dev = cuda.to_device(data, "test tensor")
    back = cuda.pinned(data.shape, np.float32)
    cuda.download(back, dev, stream)
    cuda.sync(stream)
    expect(np.array_equal(back, data), "to_device + download did not round-trip", figures)
    src = cuda.pinned(data.shape, np.float32)
    src[:] = data[::-1]
    cuda.upload(dev, src, stream)
    cuda.download(back, dev, stream)
    cuda.sync(stream)
    expect(np.array_equal(back, data[::-1]), "upload + download did not round-trip", figures)
    figures["copies"] = "ok"


def check_graph(cuda: Cuda, stream, figures: dict) -> None:
    src, dst = cuda.pinned((4096,), np.float32), cuda.pinned((4096,), np.float32)
    dev = cuda.malloc(src.nbytes, "graph buffer")
    src[:], dst[:] = 1.0, 0.0
    graph = cuda.capture(stream, lambda: (cuda.upload(dev, src, stream), cuda.download(dst, dev, stream)))
    expect(not dst.any(), "capture ran the copies instead of recording them", figures)
    src[:] = np.arange(4096, dtype=np.float32)  # a replay reads the pinned source as it is now
    cuda.launch(graph, stream)
    cuda.sync(stream)
    expect(np.array_equal(dst, src), "graph replay did not copy the current pinned source", figures)
    cuda.rt.cudaGraphExecDestroy(graph)
    figures["graph_replay"] = "ok"


def check_raising_capture(cuda: Cuda, stream, figures: dict) -> None:
    def enqueue():
        raise ValueError("enqueue failed on purpose")

    try:
        cuda.capture(stream, enqueue)
    except ValueError:
        pass
    expect(not capturing(cuda, stream), "the stream is still capturing after the enqueue raised", figures)
    src = cuda.pinned((256,), np.float32)
    dev = cuda.malloc(src.nbytes, "capture buffer")
    graph = cuda.capture(stream, lambda: cuda.upload(dev, src, stream))  # the stream still captures afterwards
    cuda.rt.cudaGraphExecDestroy(graph)
    figures["raising_capture"] = "stream left capture mode"


def check_out_of_memory(cuda: Cuda, figures: dict) -> None:
    try:
        cuda.malloc(2**50, "an impossible buffer")
    except UserError as exc:
        figures["oom_message"] = str(exc)
        return
    raise StepFailed("a 1 PiB cudaMalloc did not raise the out-of-memory UserError", figures)


def run() -> tuple[str, dict]:
    rt = import_cudart()
    figures = {"cuda_runtime_version": rt.cudaRuntimeGetVersion()[1],
               "cuda_driver_version": rt.cudaDriverGetVersion()[1]}
    cuda = Cuda(rt)
    (major, minor), name = cuda.compute_capability()
    figures.update(device=name, compute_capability=f"{major}.{minor}")
    stream = cuda.stream()
    before = free_bytes(cuda)
    cuda.malloc(256 * MIB, "256 MiB block")
    check_copies(cuda, stream, figures)
    check_graph(cuda, stream, figures)
    check_raising_capture(cuda, stream, figures)
    check_out_of_memory(cuda, figures)
    held = before - free_bytes(cuda)
    cuda.close()
    returned = free_bytes(cuda) - (before - held)
    figures.update(held_mib=held / MIB, returned_by_close_mib=returned / MIB)
    expect(held >= 256 * MIB and returned >= 256 * MIB, "close() did not give the allocations back", figures)
    return (f"Cuda wrapper on {name} (SM {major}.{minor}): copies, graph capture/replay, raising capture, OOM message, "
            f"close() returned {returned / MIB:.0f} MiB"), figures
