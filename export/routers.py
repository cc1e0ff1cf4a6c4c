"""The router of every MoE layer in an exported decoder graph: the fp32 MatMul/Gemm whose output routes.

Found by what consumes its output, the same for every lowering:
    router -> [Cast|CastLike] -> MoE/QMoE/MoELlavaMoE input 1        (ort, plugin)
    router -> Softmax -> TopK                                         (portable)
Used by validation (router agreement reads these outputs) and by the quantisers (routers stay in float).
"""
from __future__ import annotations

import onnx

MOE_OPS = ("MoE", "QMoE", "MoELlavaMoE")
PASS_THROUGH = ("Cast", "CastLike")


def consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def router_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    users = consumers(model)

    def feeds_routing(tensor: str, hops: int = 2) -> bool:
        for user in users.get(tensor, []):
            if user.op_type in MOE_OPS and len(user.input) > 1 and user.input[1] == tensor:
                return True
            if user.op_type == "Softmax" and any(u.op_type == "TopK" for u in users.get(user.output[0], [])):
                return True
            if user.op_type in PASS_THROUGH and hops and feeds_routing(user.output[0], hops - 1):
                return True
        return False
    return [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and feeds_routing(n.output[0])]
