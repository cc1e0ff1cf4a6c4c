"""The CUDA runtime calls the TensorRT backend makes, through cuda-python (no torch on the device)."""
from __future__ import annotations

import ctypes
from typing import Any, Callable

import numpy as np

from runtime.errors import UserError

from .kv_layout import Dims
from .libraries import import_cudart


class Cuda:
    """The CUDA runtime calls the engine needs; close() frees every allocation made here."""

    def __init__(self, rt):
        self.rt = rt
        self._device: list[int] = []
        self._host: list[int] = []
        self._streams: list[Any] = []

    def check(self, result, what: str):
        err, rest = result[0], result[1:]
        if err != self.rt.cudaError_t.cudaSuccess:
            name = self.rt.cudaGetErrorName(err)[1]
            name = name.decode() if isinstance(name, bytes) else str(name)
            if err == self.rt.cudaError_t.cudaErrorMemoryAllocation:
                raise UserError(f"out of GPU memory for {what}; build the engines with a smaller --max-seq, "
                                "close other GPU programs (on a Jetson the GPU shares the system RAM)")
            raise RuntimeError(f"CUDA error {name} in {what}")
        return rest[0] if len(rest) == 1 else (rest or None)

    def compute_capability(self) -> tuple[tuple[int, int], str]:
        device = self.check(self.rt.cudaGetDevice(), "cudaGetDevice")
        prop = self.check(self.rt.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
        name = prop.name.split(b"\0")[0].decode(errors="replace") if isinstance(prop.name, bytes) else prop.name
        return (int(prop.major), int(prop.minor)), str(name)

    def stream(self):
        stream = self.check(self.rt.cudaStreamCreateWithFlags(self.rt.cudaStreamNonBlocking), "a CUDA stream")
        self._streams.append(stream)
        return stream

    def malloc(self, nbytes: int, what: str) -> int:
        ptr = int(self.check(self.rt.cudaMalloc(max(int(nbytes), 1)), f"{what} ({nbytes / 2**20:.1f} MiB)"))
        self._device.append(ptr)
        return ptr

    def pinned(self, shape: Dims, dtype) -> np.ndarray:
        """Page-locked host array (what captured copies need)."""
        dtype = np.dtype(dtype)
        count = int(np.prod(shape))
        ptr = int(self.check(self.rt.cudaMallocHost(max(count * dtype.itemsize, 1)), "pinned host memory"))
        self._host.append(ptr)
        raw = (ctypes.c_uint8 * (count * dtype.itemsize)).from_address(ptr)
        return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)

    def to_device(self, array: np.ndarray, what: str) -> int:
        ptr = self.malloc(array.nbytes, what)
        self.check(self.rt.cudaMemcpy(ptr, array.ctypes.data, array.nbytes,
                                      self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice), what)
        return ptr

    def upload(self, dst: int, array: np.ndarray, stream) -> None:
        self.check(self.rt.cudaMemcpyAsync(dst, array.ctypes.data, array.nbytes,
                                           self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream), "upload")

    def download(self, array: np.ndarray, src: int, stream) -> None:
        self.check(self.rt.cudaMemcpyAsync(array.ctypes.data, src, array.nbytes,
                                           self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream), "download")

    def sync(self, stream) -> None:
        self.check(self.rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

    def capture(self, stream, enqueue: Callable[[], None]):
        """Record what `enqueue` puts on `stream` (nothing runs) -> an instantiated graph. When `enqueue` raises,
        the capture is ended and whatever graph it produced destroyed before the error goes on."""
        mode = self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self.check(self.rt.cudaStreamBeginCapture(stream, mode), "cudaStreamBeginCapture")
        try:
            enqueue()
        except BaseException:
            self._abandon_capture(stream)
            raise
        graph = self.check(self.rt.cudaStreamEndCapture(stream), "cudaStreamEndCapture")
        try:
            return self.check(self.rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        finally:
            self.rt.cudaGraphDestroy(graph)

    def _abandon_capture(self, stream) -> None:
        """End a failed capture; an invalidated capture returns an error and no graph, which is fine here."""
        err, *graph = self.rt.cudaStreamEndCapture(stream)
        if err == self.rt.cudaError_t.cudaSuccess and graph and graph[0] is not None:
            self.rt.cudaGraphDestroy(graph[0])

    def launch(self, graph_exec, stream) -> None:
        self.check(self.rt.cudaGraphLaunch(graph_exec, stream), "cudaGraphLaunch")

    def synchronize(self) -> None:
        for stream in self._streams:
            self.rt.cudaStreamSynchronize(stream)

    def close(self) -> None:
        self.synchronize()  # nothing may still be reading or writing what is freed below
        for ptr in self._device:
            self.rt.cudaFree(ptr)
        for ptr in self._host:
            self.rt.cudaFreeHost(ptr)
        for stream in self._streams:
            self.rt.cudaStreamDestroy(stream)
        self._device, self._host, self._streams = [], [], []


def detect_gpu() -> tuple[tuple[int, int], str] | None:
    """(SM, name) of the current GPU, or None without cuda-python or a GPU (the builder's --gpu auto)."""
    try:
        return Cuda(import_cudart()).compute_capability()
    except (UserError, RuntimeError):
        return None
