"""`--device auto|cpu|cuda`: which device runs a command, decided once and said on stderr.

auto picks CUDA when the engine library can use a GPU here: for ONNX Runtime, an onnxruntime build with the
CUDAExecutionProvider (the onnxruntime-gpu package) and a GPU the CUDA driver reports; for PyTorch,
torch.cuda.is_available(); TensorRT runs on CUDA only. --device cuda without that is a one-line error.
The GPU is found through the driver library (libcuda) with ctypes: no torch, no cuda-python needed.
"""
from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass
from enum import Enum

from runtime.errors import UserError

ORT_CUDA = "CUDAExecutionProvider"
ORT_GPU_HINT = ("install onnxruntime-gpu instead of onnxruntime (pip uninstall onnxruntime && "
                "pip install '.[gpu]'; on Jetson see docs/jetson.md)")


class Device(str, Enum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


@dataclass(frozen=True)
class DeviceChoice:
    device: Device  # CPU or CUDA, never AUTO
    detail: str     # what runs there, for the stderr line

    def announce(self, prog: str) -> None:
        print(f"{prog}: running on {self.device.value.upper()} ({self.detail})", file=sys.stderr)


def cuda_gpus() -> list[str]:
    """Names of the GPUs the CUDA driver reports; [] without a driver (libcuda) or a GPU."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return []
        names = []
        for i in range(count.value):
            dev, buf = ctypes.c_int(0), ctypes.create_string_buffer(256)
            ok = lib.cuDeviceGet(ctypes.byref(dev), i) == 0 and lib.cuDeviceGetName(buf, 256, dev) == 0
            names.append(buf.value.decode(errors="replace") if ok else f"GPU {i}")
        return names
    return []


def resolve_device(requested: Device, usable: bool, cuda_detail: str, cpu_detail: str, why: str, fix: str) -> DeviceChoice:
    if requested is Device.CPU:
        return DeviceChoice(Device.CPU, cpu_detail)
    if usable:
        return DeviceChoice(Device.CUDA, cuda_detail)
    if requested is Device.CUDA:
        raise UserError(f"--device cuda: {why}; {fix}")
    return DeviceChoice(Device.CPU, f"{cpu_detail}; auto: {why}")


def choose_onnxruntime(requested: Device, ort) -> DeviceChoice:
    """The device of an ONNX Runtime engine: CUDA needs the CUDA provider in this build and a GPU."""
    has_provider = ORT_CUDA in ort.get_available_providers()
    gpus = cuda_gpus() if has_provider and requested is not Device.CPU else []
    if not has_provider:
        why, fix = f"onnxruntime {ort.__version__} has no {ORT_CUDA} (the CPU package)", ORT_GPU_HINT
    else:
        why, fix = "the CUDA driver reports no GPU", "check nvidia-smi, or use --device cpu"
    return resolve_device(requested, bool(gpus), f"onnxruntime {ort.__version__} {ORT_CUDA}, {', '.join(gpus[:1])}",
                    f"onnxruntime {ort.__version__} CPUExecutionProvider", why, fix)


def choose_tensorrt(requested: Device) -> DeviceChoice:
    if requested is Device.CPU:
        raise UserError("--device cpu: the tensorrt backend runs on CUDA only; use --backend onnxruntime for the CPU")
    gpus = cuda_gpus()
    return DeviceChoice(Device.CUDA, f"TensorRT, {gpus[0] if gpus else 'GPU'}")


def ort_providers(choice: DeviceChoice) -> list[str]:
    """load_pipeline's providers for the choice (runtime.ort_engine.resolve_providers adds the CPU fallback)."""
    return ["cuda"] if choice.device is Device.CUDA else ["cpu"]


def confirm_onnxruntime(engine, choice: DeviceChoice) -> None:
    """onnxruntime falls back to the CPU with only a logged error when its CUDA provider cannot start (e.g. a
    missing cuDNN / cuBLAS of the right major): refuse instead of running on the CPU unannounced."""
    if choice.device is not Device.CUDA:
        return
    active = engine.sessions["decoder"].session.get_providers()
    if ORT_CUDA not in active:
        raise UserError(f"onnxruntime could not start its CUDA provider (sessions run on {active}); see its log "
                        "above - usually the CUDA/cuDNN libraries onnxruntime-gpu needs are missing; --device cpu "
                        "runs on the CPU")


def open_runtime(engine_dir: str, backend: str, requested: Device, prog: str, threads: int | None = None):
    """load_pipeline on the chosen device, announced on stderr. -> (Pipeline, DeviceChoice)"""
    from runtime.pipeline import load_pipeline

    if backend == "tensorrt":
        choice = choose_tensorrt(requested)
        pipeline = load_pipeline(engine_dir, backend=backend)
    else:
        from runtime.ort_engine import import_onnxruntime

        choice = choose_onnxruntime(requested, import_onnxruntime())
        pipeline = load_pipeline(engine_dir, backend=backend, providers=ort_providers(choice), threads=threads)
        try:
            confirm_onnxruntime(pipeline.engine, choice)
        except UserError:
            pipeline.close()
            raise
    choice.announce(prog)
    return pipeline, choice
