"""The decoder graph the TensorRT engine is built from, rewritten so that the KV cache is one buffer.

The exported decoder (the ONNX contract, runtime/manifest.py) takes past [B,KVH,P,D] and returns
present = Concat(past, new) [B,KVH,P+S,D]. Bound to one buffer, present (stride P+S between heads) would overwrite
past (stride P) while TensorRT still reads it, so the backend would need two copies. The engine is built from
decoder.trt.onnx instead, where per layer and key/value:

    past_key_values.i.k [B,P,KVH,D] --Transpose--> [B,KVH,P,D] --+
                                                                   Concat(axis 2) -> attention (as before)
                                               new [B,KVH,S,D] --+
                                               new --Transpose--> present.i.k [B,S,KVH,D]  (the S new positions)

Position-major, past is the prefix [0,P) of one [M,KVH,D] buffer and the new positions are written at
[P,P+S): disjoint ranges, so no output aliases an input, and TensorRT's 256-byte address alignment holds when
KVH*D*itemsize is a multiple of 256 (StableLM-1.6B fp16: 4096). What the graph must guarantee, checked here:
every present.i.k is produced by a Concat on axis 2 whose first input is the graph input past_key_values.i.k.
A graph that differs, a geometry that is not aligned, or a machine without the onnx package keeps the contract
graph and the backend's two copies (KV_LAYOUTS in runtime/tensorrt/kv_layout.py).
"""
from __future__ import annotations

from pathlib import Path

from runtime.manifest import DecoderSpec, Manifest
from runtime.tensorrt.memory import ALIGNMENT, KVMode, kv_append_aligned

APPENDED_FILE = "decoder.trt.onnx"
TO_POSITION_MAJOR = [0, 2, 1, 3]  # [B,KVH,P,D] <-> [B,P,KVH,D]: its own inverse


def prepare_append_graph(manifest: Manifest) -> str | None:
    """Write decoder.trt.onnx next to the export's decoder.onnx and return None, or return why not."""
    itemsize = manifest.parts["decoder"].input("past_key_values.0.key").np_dtype.itemsize
    target = manifest.root / APPENDED_FILE
    target.unlink(missing_ok=True)  # never write through a hard link into the source export
    return write_append_graph(manifest.path("decoder"), target, manifest.decoder, itemsize)


def onnx_source(manifest: Manifest, part: str, kv_mode: KVMode) -> Path:
    """The graph an engine is built from: the export's, or the KV-append rewrite of its decoder."""
    if part == "decoder" and kv_mode is KVMode.APPEND:
        return manifest.root / APPENDED_FILE
    return manifest.path(part)


def write_append_graph(source: Path, target: Path, decoder: DecoderSpec, itemsize: int) -> str | None:
    """Write the rewritten decoder to `target` (next to `source`, so external weights still resolve) and return
    None, or return why the contract graph is kept."""
    if not kv_append_aligned(decoder.num_kv_heads, decoder.head_dim, itemsize):
        return (f"kv_heads x head_dim x {itemsize} bytes = {decoder.num_kv_heads * decoder.head_dim * itemsize} "
                f"is not a multiple of {ALIGNMENT}")
    try:
        import onnx
    except ImportError:
        return "the onnx package is not installed (pip install onnx)"
    model = onnx.load(str(source), load_external_data=False)
    problem = _rewrite(model.graph, decoder.num_layers)
    if problem is None:
        onnx.save(model, str(target))
    return problem


def _rewrite(graph, num_layers: int) -> str | None:
    from onnx import helper

    producers = {out: node for node in graph.node for out in node.output}
    inputs = {v.name: v for v in graph.input}
    outputs = {v.name: v for v in graph.output}
    head, tail = [], []
    for i in range(num_layers):
        for kind in ("key", "value"):
            past, present = f"past_key_values.{i}.{kind}", f"present.{i}.{kind}"
            concat = producers.get(present)
            axis = next((helper.get_attribute_value(a) for a in concat.attribute if a.name == "axis"), None) \
                if concat is not None and concat.op_type == "Concat" else None
            if axis not in (2, -2) or concat.input[0] != past or past not in inputs or present not in outputs:
                return f"{present} is not Concat({past}, new) on axis 2"
            head_major, everything = f"{past}/head_major", f"{present}/all"
            _rename_uses(graph, past, head_major)
            _rename_uses(graph, present, everything)
            concat.output[0] = everything
            head.append(helper.make_node("Transpose", [past], [head_major], perm=TO_POSITION_MAJOR,
                                         name=f"/decoder/layers.{i}/{kind}/past/Transpose"))
            tail.append(helper.make_node("Transpose", [concat.input[1]], [present], perm=TO_POSITION_MAJOR,
                                         name=f"/decoder/layers.{i}/{kind}/present/Transpose"))
            _swap_axes(inputs[past])
            _new_positions(outputs[present], graph)
    nodes = head + list(graph.node) + tail
    del graph.node[:]
    graph.node.extend(nodes)
    return None


def _rename_uses(graph, old: str, new: str) -> None:
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name == old:
                node.input[k] = new


def _swap_axes(value) -> None:
    dims = value.type.tensor_type.shape.dim
    a, b = dims[1].__deepcopy__({}), dims[2].__deepcopy__({})
    dims[1].CopyFrom(b)
    dims[2].CopyFrom(a)


def _new_positions(value, graph) -> None:
    """present [B,KVH,P+S,D] -> [B,S,KVH,D], S named as inputs_embeds' axis 1."""
    dims = value.type.tensor_type.shape.dim
    kv_heads = dims[1].__deepcopy__({})
    seq = next(v for v in graph.input if v.name == "inputs_embeds").type.tensor_type.shape.dim[1]
    dims[1].CopyFrom(seq)
    dims[2].CopyFrom(kv_heads)
