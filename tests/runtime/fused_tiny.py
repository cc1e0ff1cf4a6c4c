"""A fused-attention variant of the tiny export (rt_helpers): its decoder runs com.microsoft.GroupQueryAttention,
the op the default `ort` export uses, so the runtime's shared KV buffer (bound once as past and present, written
in place) is exercised without a torch export. Shapes as in rt_helpers, but one head of D = 8 (the op's CPU
kernel takes head sizes in multiples of 8): H = 8, V vocabulary.

  decoder: x = inputs_embeds [B,S,H]
           layer i: out_i, present.i.* = GroupQueryAttention(q=x, k=x * KEY_SCALE[i], v=x * VALUE_SCALE[i],
                    past.i.*, seqlens_k = sum(mask) - 1, total = T), one query and kv head, no rotary
           logits = (sum_i out_i)[:, -1] @ W + MASK_COEF * sum(attention_mask) + POS_COEF * max(position_ids)
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from rt_helpers import (HIDDEN, KEY_SCALE, MASK_COEF, POS_COEF, VALUE_SCALE, VOCAB, _const, _io, _tensor_specs,
                        build_tiny_export)

KVH, HEAD_DIM = 1, HIDDEN


def build_fused_tiny_export(out: Path, num_layers: int = 2, max_positions: int = 512) -> dict[str, np.ndarray]:
    """The fp32 tiny export with the decoder above; returns its weights (for fused_expected_logits)."""
    import onnx
    from onnx import helper

    weights = build_tiny_export(out, np.float32, num_layers, max_positions)
    decoder = _fused_decoder(weights["lm_head"], num_layers)
    onnx.checker.check_model(decoder)
    onnx.save(decoder, str(Path(out) / "decoder.onnx"))
    manifest = json.loads((Path(out) / "manifest.json").read_text())
    dtype_of = lambda elem: np.dtype(helper.tensor_dtype_to_np_dtype(elem)).name  # noqa: E731
    manifest["attention"] = "fused"
    manifest["decoder"] |= {"num_kv_heads": KVH, "head_dim": HEAD_DIM}
    manifest["parts"]["decoder"] |= {"inputs": _tensor_specs(decoder.graph.input, dtype_of),
                                     "outputs": _tensor_specs(decoder.graph.output, dtype_of)}
    (Path(out) / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return weights


def fused_expected_logits(all_embeds: np.ndarray, weights: dict[str, np.ndarray]) -> np.ndarray:
    """Logits [V] after the positions all_embeds [t,H] are cached: causal attention of the last position, in
    numpy (float64), the op's definition written out."""
    t = all_embeds.shape[0]
    x = all_embeds.astype(np.float64).reshape(t, KVH, HEAD_DIM)
    total = np.zeros((KVH, HEAD_DIM))
    for key_scale, value_scale in zip(KEY_SCALE, VALUE_SCALE):
        scores = np.einsum("hd,thd->ht", x[-1], x * key_scale) / np.sqrt(HEAD_DIM)  # [KVH,t]
        probs = np.exp(scores - scores.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        total += np.einsum("ht,thd->hd", probs, x * value_scale)
    return total.reshape(HIDDEN) @ weights["lm_head"] + MASK_COEF * t + POS_COEF * (t - 1)


def _fused_decoder(lm_head: np.ndarray, num_layers: int):
    from onnx import TensorProto, helper

    n = helper.make_node
    f = TensorProto.FLOAT
    c = lambda name, a: _const(name, np.asarray(a, dtype=np.float32))  # noqa: E731
    nodes = [
        n("ReduceSum", ["attention_mask", "axis1"], ["mask_len"], keepdims=1),  # [B,1]
        n("Sub", ["mask_len", "one"], ["last"]),
        n("Squeeze", ["last", "axis1"], ["last_b"]),
        n("Cast", ["last_b"], ["seqlens_k"], to=TensorProto.INT32),  # [B]
        n("Shape", ["attention_mask"], ["t"], start=1, end=2),
        n("Squeeze", ["t", "axis0"], ["t_scalar"]),
        n("Cast", ["t_scalar"], ["total"], to=TensorProto.INT32),  # scalar
    ]
    inputs = [_io("inputs_embeds", f, ["B", "S", HIDDEN]), _io("attention_mask", TensorProto.INT64, ["B", "T"]),
              _io("position_ids", TensorProto.INT64, ["B", "S"])]
    outputs, outs = [], []
    inits = [_const("axis0", np.array([0], np.int64)), _const("axis1", np.array([1], np.int64)),
             _const("one", np.array(1, np.int64)), c("w", lm_head), c("mask_coef", MASK_COEF),
             c("pos_coef", POS_COEF), _const("minus1", np.array([-1], np.int64)),
             _const("big", np.array([1 << 30], np.int64)), _const("h_shape", np.array([0, HIDDEN], np.int64))]
    for i in range(num_layers):
        p = f"/decoder/layers.{i}"
        inits += [c(f"{p}/key_scale", KEY_SCALE[i]), c(f"{p}/value_scale", VALUE_SCALE[i])]
        past = [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        present = [f"present.{i}.key", f"present.{i}.value"]
        inputs += [_io(name, f, ["B", KVH, "P", HEAD_DIM]) for name in past]
        outputs += [_io(name, f, ["B", KVH, "T", HEAD_DIM]) for name in present]
        nodes += [n("Mul", ["inputs_embeds", f"{p}/key_scale"], [f"{p}/k"]),
                  n("Mul", ["inputs_embeds", f"{p}/value_scale"], [f"{p}/v"]),
                  n("GroupQueryAttention", ["inputs_embeds", f"{p}/k", f"{p}/v", *past, "seqlens_k", "total"],
                    [f"{p}/out", *present], domain="com.microsoft", num_heads=KVH, kv_num_heads=KVH)]
        outs.append(f"{p}/out")
    nodes += [
        n("Sum", outs, ["sum"]),  # [B,S,H]
        n("Slice", ["sum", "minus1", "big", "axis1"], ["last_pos"]),  # [B,1,H]
        n("Reshape", ["last_pos", "h_shape"], ["flat"]),
        n("MatMul", ["flat", "w"], ["head"]),  # [B,V]
        n("Cast", ["mask_len"], ["mask_f"], to=f),
        n("Mul", ["mask_f", "mask_coef"], ["mask_term"]),
        n("ReduceMax", ["position_ids"], ["pos_max"], axes=[1], keepdims=1),
        n("Cast", ["pos_max"], ["pos_f"], to=f),
        n("Mul", ["pos_f", "pos_coef"], ["pos_term"]),
        n("Add", ["head", "mask_term"], ["with_mask"]),
        n("Add", ["with_mask", "pos_term"], ["logits"]),
    ]
    graph = helper.make_graph(nodes, "tiny_fused", inputs, [_io("logits", f, ["B", VOCAB]), *outputs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    return model
