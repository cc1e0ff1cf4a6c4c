"""Reading and writing one exported part around a quantiser, and what each quantiser reports about it."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import onnx

EXTERNAL_DATA_BYTES = 1 << 30


@dataclass
class PartReport:
    quantized_nodes: int = 0     # MatMul/Gemm/Conv nodes with quantised weights
    embeddings: int = 0          # Gather tables turned into GatherBlockQuantized
    float_nodes: list[str] = field(default_factory=list)  # weight nodes kept float on purpose (routers)
    moe_nodes: int = 0           # com.microsoft.MoE nodes turned into QMoE
    moe_float: int = 0           # MoE nodes left float (widths not divisible by the block, or asked for)

    def to_dict(self) -> dict:
        return {"quantized_nodes": self.quantized_nodes, "embedding_tables": self.embeddings,
                "float_routers": self.float_nodes,
                "qmoe_nodes": self.moe_nodes, "float_moe_nodes": self.moe_float}


def load(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path))


def weight_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def save(model: onnx.ModelProto, path: Path) -> None:
    """One file, or graph + path.name.data beside it when the weights pass 1 GiB (protobuf stops at 2)."""
    big = weight_bytes(model) > EXTERNAL_DATA_BYTES
    onnx.save(model, str(path), save_as_external_data=big, location=path.name + ".data" if big else None)


@contextlib.contextmanager
def quiet_quantizer():
    """onnxruntime.quantization logs every skipped node at INFO/WARNING; keep the CLI readable."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
