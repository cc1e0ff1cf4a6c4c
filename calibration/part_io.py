"""Reading and writing one exported part around a quantiser, and what each quantiser reports about it."""
from __future__ import annotations

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


def finish_streamed(model: onnx.ModelProto, io, dst: Path) -> None:
    """Write a part quantised through tensor_io.TensorIO (writing `dst`.data as it went): unused initializers
    dropped, the kept external ones copied over, then the graph; a part whose weights stay under
    EXTERNAL_DATA_BYTES is folded back into one file, as `save` writes it."""
    from onnx.external_data_helper import load_external_data_for_model
    if any(n.domain == "com.microsoft" for n in model.graph.node) and \
            not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    external = io.finish()
    data = dst.with_name(dst.name + ".data")
    if external + weight_bytes(model) <= EXTERNAL_DATA_BYTES:
        if external:
            load_external_data_for_model(model, str(dst.parent))
        data.unlink(missing_ok=True)
    onnx.save(model, str(dst))
