"""A deserialised engine (TrtPart) and an execution context on one of its profiles (TrtRunner)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.errors import UserError

from .engine_reader import deserialize_engine
from .kv_layout import Dims
from .libraries import trt_logger
from .memory import ALIGNMENT


class TrtPart:
    """One deserialised engine: its I/O names and numpy dtypes."""

    def __init__(self, trt, runtime, path: Path):
        self.path = path
        self.engine = deserialize_engine(trt, runtime, path)
        if self.engine is None:
            raise UserError(f"{path}: TensorRT cannot deserialise it ({trt_logger(trt).last_error()}); rebuild "
                            "the engines on this device with moe-export --target tensorrt --from-onnx")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: numpy_dtype(trt, self.engine.get_tensor_dtype(n), path, n) for n in names}

    def max_shape(self, name: str, profile: int) -> Dims:
        return tuple(self.engine.get_tensor_profile_shape(name, profile)[2])

    def scratch_bytes(self, profile: int) -> int:
        engine = self.engine
        if hasattr(engine, "get_device_memory_size_for_profile_v2"):  # 10.1+
            return int(engine.get_device_memory_size_for_profile_v2(profile))
        return int(getattr(engine, "device_memory_size_v2", None) or engine.device_memory_size)


def numpy_dtype(trt, dtype, path: Path, name: str) -> np.dtype:
    try:
        return np.dtype(trt.nptype(dtype))
    except TypeError:
        raise UserError(f"{path}: tensor {name!r} has type {dtype}, which numpy cannot hold (bf16/fp8 I/O); "
                        "export the graph with fp16 or fp32 inputs and outputs") from None


class TrtRunner:
    """An execution context on one profile of a part; activation memory supplied by the caller."""

    def __init__(self, trt, part: TrtPart, profile: int, stream, label: str):
        self.part, self.profile, self.label, self.stream = part, profile, label, stream
        strategy = getattr(getattr(trt, "ExecutionContextAllocationStrategy", None), "USER_MANAGED", None)
        self.user_memory = strategy is not None
        self.context = part.engine.create_execution_context(strategy) if self.user_memory \
            else part.engine.create_execution_context()
        if self.context is None:
            raise UserError(f"{part.path}: cannot create an execution context ({trt_logger(trt).last_error()})")

    def activate(self, memory: int, size: int) -> None:
        """Give the context its activation memory (shared by all contexts), then select its profile."""
        if self.user_memory:
            if hasattr(self.context, "set_device_memory"):  # 10.1+
                self.context.set_device_memory(memory, size)
            else:
                self.context.device_memory = memory
        if self.profile and not self.context.set_optimization_profile_async(self.profile, int(self.stream)):
            raise UserError(f"{self.part.path}: cannot select optimisation profile {self.profile}")

    def set_shapes(self, shapes: dict[str, Dims]) -> None:
        for name, shape in shapes.items():
            if not self.context.set_input_shape(name, tuple(int(d) for d in shape)):
                raise UserError(f"{self.label}: input {name!r} shape {tuple(shape)} lies outside the engine's "
                                f"profile {self.profile} (rebuild with a larger --max-seq / --max-batch)")

    def output_shape(self, name: str) -> Dims:
        return tuple(self.context.get_tensor_shape(name))

    def enqueue(self, shapes: dict[str, Dims], addresses: dict[str, int]) -> None:
        self.set_shapes(shapes)
        for name, ptr in addresses.items():
            if not self.context.set_tensor_address(name, int(ptr)):
                raise RuntimeError(f"{self.label}: TensorRT refused address {int(ptr):#x} for {name!r} "
                                   f"(it must be {ALIGNMENT}-byte aligned)")
        if not self.context.execute_async_v3(int(self.stream)):
            raise RuntimeError(f"{self.label}: execute_async_v3 failed")
