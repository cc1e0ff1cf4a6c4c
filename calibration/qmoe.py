"""Expert weights of `com.microsoft.MoE` nodes as `com.microsoft.QMoE` (weight-only, 8 or 4 bit).

Layout (onnxruntime >= 1.23 QMoE, `quant_type="int"`, `weights_prepacked=0` - the default -1 selects an
execution-provider-specific prepacked layout; verified numerically against the fp32 MoE op in
tests/calibration/test_qmoe.py):

  fc1_experts_weights  uint8 [E, F, H*bits/8]   rows = output features, in the MoE op's order (SwiGLU rows
                                                interleaved), K = H packed along the last axis (blockwise.py)
  fc1_scales           T     [E, F] (one scale per row)  or  [E, F, H/block]
  fc2_experts_weights  uint8 [E, H, I*bits/8]   fc2_scales [E, H] or [E, H, I/block]
  no zero-point inputs: the op's default centre 2^(bits-1), as blockwise.quantize writes the codes.

Kernel choice on CPU (onnxruntime 1.32), measured at H=1024, I=2816, E=4, k=2 on the 2-core machine:
  8 bit, one scale per row   fp32 dequantising kernel, == MoE(dequantised) to ~1e-7, 15.8 ms / decode token
  8 bit, block 128           int8 activations,        cosine 0.9998 vs fp32,      2.0 ms   (int8 exports: block 64)
  4 bit, block 32            fp32 activations,        cosine 0.9886 vs fp32,      6.5 ms
  4 bit, block 32, accuracy_level 4 (int8 activations) cosine 0.9885,              1.3 ms   <- int4 exports
(fp32 com.microsoft.MoE: ~8.5 ms). The routing input (fp32 router logits) is never quantised.
"""
from __future__ import annotations

import onnx
from onnx import helper

from .blockwise import BlockQuant, block_for
from .graph import drop_unused_initializers
from .tensor_io import TensorIO

MOE_DOMAIN = "com.microsoft"
# attributes of the MoE node that QMoE takes over unchanged
KEPT_ATTRIBUTES = ("k", "activation_type", "normalize_routing_weights", "use_sparse_mixer", "swiglu_fusion",
                   "swiglu_limit", "activation_alpha", "activation_beta")


def qmoe_node(moe: onnx.NodeProto, names: dict[str, str], spec: BlockQuant, accuracy_level: int = 0) -> onnx.NodeProto:
    """A QMoE node for `moe` (inputs: x, logits, fc1_w, fc1_b?, fc2_w, fc2_b?) with quantised weight names."""
    x, logits, _, fc1_bias, _, fc2_bias = (list(moe.input) + [""] * 6)[:6]
    inputs = [x, logits, names["fc1"], names["fc1_scales"], fc1_bias, names["fc2"], names["fc2_scales"], fc2_bias]
    attrs = {a.name: helper.get_attribute_value(a) for a in moe.attribute if a.name in KEPT_ATTRIBUTES}
    attrs.update(expert_weight_bits=spec.bits, quant_type="int", weights_prepacked=0)
    if spec.block_size:
        attrs["block_size"] = spec.block_size
    if accuracy_level:
        attrs["accuracy_level"] = accuracy_level
    name = moe.name.replace("moe", "qmoe") if moe.name else None
    return helper.make_node("QMoE", inputs, list(moe.output), name=name, domain=MOE_DOMAIN, **attrs)


def moe_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "MoE" and n.domain == MOE_DOMAIN]


def quantize_moe_experts(model: onnx.ModelProto, bits: int, block_size: int | None | str = "auto",
                         accuracy_level: int = 0, fc1_names: set[str] | None = None, io: TensorIO | None = None) -> int:
    """Replace every com.microsoft.MoE node by a QMoE node (in place); returns how many were replaced.

    block_size "auto": blockwise.block_for(H, I), as is a block that does not divide H and I; None: one scale
    per row. accuracy_level 4 lets 4-bit
    experts use int8 activations (8-bit block-wise experts always do). A node whose widths fit no block keeps
    its float experts; with `fc1_names`, only the nodes whose fc1 weight is named there are replaced. `io`
    reads and writes the weights one tensor at a time (tensor_io.py; default: in the proto).
    """
    io = io or TensorIO(model)
    done: dict[str, tuple[str, str]] = {}  # shared weight initializers are quantised once
    replaced = 0
    for node in moe_nodes(model):
        fc1, fc2 = node.input[2], node.input[4]
        if fc1 not in io or fc2 not in io or (fc1_names is not None and fc1 not in fc1_names):
            continue
        widths = [io.shape(fc1)[-1], io.shape(fc2)[-1]]
        fits = block_size is None or (block_size != "auto" and all(w % block_size == 0 for w in widths))
        block = block_size if fits else block_for(widths, bits)
        if block is None and not fits:
            continue
        spec = BlockQuant(bits, block)
        names = {}
        for key, weight in (("fc1", fc1), ("fc2", fc2)):
            if weight not in done:
                codes, scales = io.quantize(weight, spec)
                base = f"{weight}.q{spec.bits}"
                io.add(base, codes)
                io.add(base + ".scales", scales)
                done[weight] = (base, base + ".scales")
            names[key], names[key + "_scales"] = done[weight]
        position = list(model.graph.node).index(node)
        model.graph.node.remove(node)
        model.graph.node.insert(position, qmoe_node(node, names, spec, accuracy_level))
        replaced += 1
    drop_unused_initializers(model)
    return replaced
