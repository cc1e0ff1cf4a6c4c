"""MoE lowering: one traced op, three ONNX translations (`--moe-impl ort | plugin | portable`).

During export every `MoELayer` is swapped for `ExportMoE`, which calls the torch custom op
`moe_llava::moe(x, router_logits, fc1, fc1_bias, fc2, fc2_bias, k, activation)`. The router MatMul stays a
plain fp32 node in front of it; the op's translation decides what the ONNX graph holds:

  ort       com.microsoft.MoE (onnxruntime >= 1.23.1, CPU + CUDA). SwiGLU needs fc1 rows interleaved
            [gate_0, up_0, gate_1, ...] (swiglu_fusion=1); GELU is the tanh form (checked numerically).
  plugin    moe_llava.MoELlavaMoE, the TensorRT plugin (runtime/plugins). fc1 = [gate; up] concatenated.
  portable  standard ONNX ops, grouped per expert:

      logits -> Softmax -> TopK(k) -> renormalise            (/router)
      for e in 0..E-1 (unrolled):                             (/expert.e)
        slots = NonZero(experts == e)   rows = tokens[slots]  (only tokens routed to e)
        y = fc2_e(act(fc1_e(x[rows]))) * weight[slots]
        out = ScatterND(out, rows, GatherND(out, rows) + y)   (no reduction attribute)
      TopK picks distinct experts, so a token reaches expert e at most once: `rows` holds no index twice and
      the gather-add-scatter is exactly a scatter-add - one TensorRT's ONNX parser accepts (it rejects any
      ScatterND `reduction`).
      An expert with no tokens runs a 0-row MatMul, so decode reads only k experts' weights and
      prefill never copies weights per token.
All three are validated against the PyTorch module (export/validate.py).
"""
from __future__ import annotations

from enum import Enum

import torch
from torch import nn

from moe_llava.moe import Activation, MoELayer
from moe_llava.upcast import stored

from .contrib_schema import register_schema

PLUGIN_DOMAIN, PLUGIN_OP, PLUGIN_VERSION = "moe_llava", "MoELlavaMoE", "1"
PLUGIN_ACTIVATION = {Activation.SWIGLU: 0, Activation.GELU_TANH: 1, Activation.GELU_ERF: 2}


class MoEImpl(str, Enum):
    AUTO = "auto"
    ORT = "ort"
    PLUGIN = "plugin"
    PORTABLE = "portable"

    def resolve(self, target: str) -> "MoEImpl":
        if self is not MoEImpl.AUTO:
            return self
        return MoEImpl.PLUGIN if target == "tensorrt" else MoEImpl.ORT


@torch.library.custom_op("moe_llava::moe", mutates_args=())
def moe_op(x: torch.Tensor, router_logits: torch.Tensor, fc1: torch.Tensor, fc1_bias: torch.Tensor,
           fc2: torch.Tensor, fc2_bias: torch.Tensor, k: int, activation: str, interleaved: bool) -> torch.Tensor:
    """[T,H] -> [T,H]; fc1 is [E,F,H], SwiGLU rows [gate; up] or interleaved. Export-only: torch.export traces
    the fake below and translation_table lowers the node, so nothing runs a body (MoELayer is the eager model)."""
    raise NotImplementedError("moe_llava::moe is only exported, never run: run the MoELayer it stands in for")


@moe_op.register_fake
def _(x, router_logits, fc1, fc1_bias, fc2, fc2_bias, k, activation, interleaved):
    return torch.empty_like(x)


def interleave_rows(t: torch.Tensor) -> torch.Tensor:
    """[E, 2I, ...] as [gate; up] -> rows [gate_0, up_0, gate_1, up_1, ...] (ORT's swiglu_fusion=1)."""
    gate, up = t.chunk(2, dim=1)                                              # [E,I,...] each
    return torch.stack([gate, up], dim=2).flatten(1, 2)                        # [E,I,2,...] -> [E,2I,...]


def deinterleave_rows(t: torch.Tensor) -> torch.Tensor:
    """interleave_rows undone: [gate_0, up_0, gate_1, up_1, ...] -> [gate; up] (ExportMoE.restore)."""
    return torch.cat([t[:, 0::2], t[:, 1::2]], dim=1)                          # [E,2I,...]


class ExportMoE(nn.Module):
    """Stand-in for a MoELayer in the exported graph: fp32 router MatMul, then the `moe_llava::moe` op."""

    def __init__(self, moe: MoELayer, impl: "MoEImpl"):
        super().__init__()
        self.top_k, self.activation = moe.top_k, moe.activation.value
        # com.microsoft.MoE wants SwiGLU rows interleaved; done once here, not in the graph
        self.interleaved = impl is MoEImpl.ORT and moe.activation is Activation.SWIGLU
        self.router = moe.router
        # the weights as stored (16-bit when the model computes in fp32 from a 16-bit checkpoint, upcast.py):
        # the graph then casts them, and the traced model holds no fp32 copy of the experts
        fc1, fc2 = stored(moe, "fc1_weight"), stored(moe, "fc2_weight")
        dtype = fc1.dtype
        e, f, h = fc1.shape
        self.register_buffer("fc1", fc1.detach(), persistent=False)
        self.register_buffer("fc2", fc2.detach(), persistent=False)
        zeros = lambda *shape: torch.zeros(*shape, dtype=dtype)  # noqa: E731 - plugin wants biases present
        self.register_buffer("fc1_bias", stored(moe, "fc1_bias").detach() if moe.fc1_bias is not None
                             else zeros(e, f), persistent=False)
        self.register_buffer("fc2_bias", stored(moe, "fc2_bias").detach() if moe.fc2_bias is not None
                             else zeros(e, h), persistent=False)
        self.__dict__["source"] = moe  # not a submodule: its parameters must not enter the graph twice
        if self.interleaved:  # in place (one layer's temporary at a time), undone by `restore`: copies of
            with torch.no_grad():  # every layer's fc1 would add 4.4 GB at the released size in fp32
                fc1.copy_(interleave_rows(fc1))
            self.fc1_bias = interleave_rows(self.fc1_bias)

    def restore(self) -> None:
        """Give the MoELayer back its [gate; up] row order (once; this stand-in is done with after)."""
        if self.interleaved and not self.__dict__.get("restored"):
            with torch.no_grad():
                fc1 = stored(self.source, "fc1_weight")
                fc1.copy_(deinterleave_rows(fc1))
            self.__dict__["restored"] = True

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])                                # [T,H]
        logits = self.router(x.float())                                         # [T,E] fp32
        fc1, fc1_bias, fc2, fc2_bias = (t.to(x.dtype) for t in (self.fc1, self.fc1_bias, self.fc2, self.fc2_bias))
        y = moe_op(x, logits, fc1, fc1_bias, fc2, fc2_bias, self.top_k, self.activation, self.interleaved)
        return y.reshape(shape)


def swap_in_export_moe(model: nn.Module, impl: MoEImpl) -> int:
    """Replace every MoELayer under `model` by an ExportMoE (in place); returns how many."""
    swapped = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, MoELayer):
                setattr(module, child_name, ExportMoE(child, impl))
                swapped += 1
    return swapped


# ---- ONNX translations ------------------------------------------------------------------------
def register_moe_schemas() -> None:
    weights = [("fc1_experts_weights", "T", False), ("fc1_experts_bias", "T", True),
               ("fc2_experts_weights", "T", False), ("fc2_experts_bias", "T", True)]
    register_schema("com.microsoft", "MoE", [("input", "T", False), ("router_probs", "T", False)] + weights,
                     [("k", "INT"), ("activation_type", "STRING"), ("normalize_routing_weights", "INT"),
                      ("swiglu_fusion", "INT"), ("use_sparse_mixer", "INT")])
    register_schema(PLUGIN_DOMAIN, PLUGIN_OP,
                     [("hidden", "T", False), ("router_logits", "R", False), ("fc1_weight", "T", False),
                      ("fc1_bias", "T", False), ("fc2_weight", "T", False), ("fc2_bias", "T", False)],
                     [("num_experts", "INT"), ("top_k", "INT"), ("activation", "INT"),
                      ("normalize_routing_weights", "INT"), ("plugin_version", "STRING"),
                      ("plugin_namespace", "STRING")])


def translation_table(impl: MoEImpl) -> dict:
    register_moe_schemas()
    translate = {MoEImpl.ORT: _ort, MoEImpl.PLUGIN: _plugin, MoEImpl.PORTABLE: _portable}[impl]
    return {torch.ops.moe_llava.moe.default: translate}


def _ort(x, router_logits, fc1, fc1_bias, fc2, fc2_bias, k: int, activation: str, interleaved: bool):
    from onnxscript import opset18 as op
    from onnxscript.values import Opset
    msft = Opset("com.microsoft", 1)
    swiglu = activation == Activation.SWIGLU.value
    if activation == Activation.GELU_ERF.value:
        raise NotImplementedError("com.microsoft.MoE has no erf-GELU; use --moe-impl portable")
    logits = op.CastLike(router_logits, x)
    attrs = dict(k=k, activation_type="swiglu" if swiglu else "gelu", normalize_routing_weights=int(k > 1))
    if swiglu:
        attrs["swiglu_fusion"] = 1
    return msft.MoE(x, logits, fc1, fc1_bias, fc2, fc2_bias, **attrs)


def _plugin(x, router_logits, fc1, fc1_bias, fc2, fc2_bias, k: int, activation: str, interleaved: bool):
    from onnxscript.values import Opset
    plugin = Opset(PLUGIN_DOMAIN, 1)
    num_experts = fc1.shape[0]
    return plugin.MoELlavaMoE(x, router_logits, fc1, fc1_bias, fc2, fc2_bias,
                              num_experts=int(num_experts), top_k=k,
                              activation=PLUGIN_ACTIVATION[Activation(activation)],
                              normalize_routing_weights=int(k > 1),
                              plugin_version=PLUGIN_VERSION, plugin_namespace=PLUGIN_DOMAIN)


def _portable(x, router_logits, fc1, fc1_bias, fc2, fc2_bias, k: int, activation: str, interleaved: bool):
    from onnxscript import opset18 as op
    num_experts = int(fc1.shape[0])
    probs = op.Softmax(router_logits, axis=-1)                                 # [T,E] fp32
    weights, experts = op.TopK(probs, [k], axis=-1)                            # [T,K]
    if k > 1:
        weights = op.Div(weights, op.ReduceSum(weights, [-1], keepdims=1))
    weights = op.CastLike(op.Reshape(weights, [-1, 1]), x)                     # [T*K,1]
    experts = op.Reshape(experts, [-1])                                        # [T*K]
    slots_all = op.Range(op.Constant(value_int=0), op.Size(experts), op.Constant(value_int=1))
    tokens = op.Div(slots_all, op.Constant(value_int=k))                       # [T*K] token of each slot
    out = op.Mul(x, op.CastLike(0, x))                                         # [T,H] zeros
    for e in range(num_experts):
        slots = op.Reshape(op.NonZero(op.Equal(experts, e)), [-1])             # [n]
        rows = op.Gather(tokens, slots)                                        # [n]
        h = op.Add(op.MatMul(op.Gather(x, rows), op.Transpose(op.Gather(fc1, e), perm=[1, 0])),
                   op.Gather(fc1_bias, e))                                     # [n,F]
        h = _onnx_activation(op, h, activation)                                # [n,I]
        y = op.Add(op.MatMul(h, op.Transpose(op.Gather(fc2, e), perm=[1, 0])), op.Gather(fc2_bias, e))
        index = op.Unsqueeze(rows, [1])                                        # [n,1], unique
        out = op.ScatterND(out, index, op.Add(op.GatherND(out, index), op.Mul(y, op.Gather(weights, slots))))
    return out


def drop_scatter_reduction(model) -> None:
    """Delete ScatterND's reduction="none" (the default, which onnxscript writes out) from an exported
    onnx_ir model: TensorRT's ONNX parser refuses a `reduction` attribute whatever its value."""
    for node in model.graph.all_nodes():
        attr = node.attributes.get("reduction") if node.op_type == "ScatterND" else None
        if attr is not None and attr.value == "none":
            del node.attributes["reduction"]


def _onnx_activation(op, h, activation: str):
    if activation == Activation.SWIGLU.value:
        gate, up = op.Split(h, num_outputs=2, axis=-1)
        return op.Mul(op.Mul(gate, op.Sigmoid(gate)), up)
    if activation == Activation.GELU_TANH.value:
        c = op.CastLike(0.7978845608028654, h)                                 # sqrt(2/pi)
        inner = op.Mul(c, op.Add(h, op.Mul(op.CastLike(0.044715, h), op.Mul(h, op.Mul(h, h)))))
        return op.Mul(op.Mul(op.CastLike(0.5, h), h), op.Add(op.CastLike(1.0, h), op.Tanh(inner)))
    return op.Mul(op.Mul(op.CastLike(0.5, h), h),
                  op.Add(op.CastLike(1.0, h), op.Erf(op.Div(h, op.CastLike(1.4142135623730951, h)))))
