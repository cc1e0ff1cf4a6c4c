"""`--kv-cache int8`: a fused-attention decoder whose KV cache is stored as int8 (GroupQueryAttention's own
quantised cache), written as a rewrite of a float export's decoder.onnx.

Shapes: L layers, KVH kv heads, D head dim, n cached positions, R rotary dims (a prefix of D).

Why: on the CPU the decode step's growth with the context is the op reading the cache (README, fused attention:
GroupQueryAttention is the only op whose time grows from 64 to 960 cached positions, +1.7 ms over 4 layers on
the `small` preset, fp32). An int8 cache is a quarter of the fp32 bytes and onnxruntime 1.32's CPU kernel reads
it without widening it first (+0.57 ms). An fp16 cache under an fp32 graph is widened whole every step (slower
than fp32); an all-fp16 attention barely gains on decode. The price: the same kernel computes a prompt's
attention over an int8 cache ~2.5x slower than over fp32, so a 700-position prefill takes longer (README).

    qkv [B,S,(NH+2KVH)*D] fp32 --GroupQueryAttention(k_quant_type=v_quant_type=PER_CHANNEL,
        kv_cache_bit_width=8, past_key/past_value int8 [B,KVH,M,D], k_scale/v_scale fp32 [1,KVH,1,D])--> out
    stored = clip(round(x / scale), -128, 127); attention reads stored * scale (tests/export/test_kv_cache_int8.py)

Scales are fixed in the graph (the op takes no per-token scales), so they are calibrated once: the float export
answers 4 samples greedily (2 drawn scenes with a prompt each, the same prompts without an image; not the
validation's samples), and each channel's scale is its largest |value| over the cached positions times MARGIN,
/ 127. Key channels under the rotary are turned pairwise, (i, i + R/2), by an angle
that grows with the position, so a position the calibration did not reach can move a pair's magnitude from one
channel to the other: both channels get the pair's largest norm, which no angle exceeds.
"""
from __future__ import annotations

import dataclasses
import json
from enum import Enum
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from runtime.errors import UserError
from runtime.manifest import MANIFEST_FILE, Manifest, PartSpec

INT8_MAX = 127
MARGIN = 1.5  # headroom for inputs unlike the 4 calibration samples (1.25 let a tiny model's text-only prompt saturate)
GQA_K_SCALE, GQA_V_SCALE = 12, 13  # GroupQueryAttention input slots (after attention_bias 10, head_sink 11)
CACHE_PREFIXES = ("past_key_values.", "present.")
CALIBRATION_SEED = 1   # export/compare.py's validation scenes use seed 0
CALIBRATION_PROMPTS = ("Describe the shapes and their colours.", "What is on the left of the image?")


class KVCacheType(str, Enum):
    FLOAT = "float"
    INT8 = "int8"

    def check(self, attention: str) -> "KVCacheType":
        if self is KVCacheType.INT8 and attention != "fused":
            raise UserError(f"--kv-cache int8 is GroupQueryAttention's quantised cache: it needs fused attention "
                            f"(--moe-impl ort, --attention fused or auto), not {attention!r}; drop --kv-cache")
        return self


def quantise_kv_cache(calibrate_on: Path, directory: Path, rotary: int) -> None:
    """Calibrate scales on the float export `calibrate_on` and give the decoder in `directory` an int8 cache
    (the same directory, or the weight-quantised copy of it); `rotary`: R, export.attention_lowering.rotary_dims.
    The samples are not the validation's (other scenes, other prompts), so validation.json measures the cache
    on inputs it was not fitted to."""
    from moe_llava.data import draw_scene, sample_scene
    rng = np.random.default_rng(CALIBRATION_SEED)
    images = [draw_scene(sample_scene(rng)) for _ in CALIBRATION_PROMPTS] + [None] * len(CALIBRATION_PROMPTS)
    absmax = calibrate_absmax(calibrate_on, images, CALIBRATION_PROMPTS * 2)  # with and without an image
    write_int8_cache(directory, channel_scales(absmax, rotary))


# ---- calibration --------------------------------------------------------------------------------
def calibrate_absmax(directory: Path, images, prompts, max_new_tokens: int = 16) -> np.ndarray:
    """[L,2,KVH,D] largest |value| per cache channel while the float export in `directory` answers the samples."""
    from runtime.pipeline import load_pipeline
    absmax = None
    with load_pipeline(directory, threads=1) as pipeline:
        for image, prompt in zip(images, prompts):
            pipeline.generate(image, prompt, max_new_tokens)
            cached = np.abs(pipeline.engine.cached_kv().astype(np.float32)).max(axis=3)   # [L,2,KVH,D]
            absmax = cached if absmax is None else np.maximum(absmax, cached)
    return absmax


def channel_scales(absmax: np.ndarray, rotary_dims: int) -> np.ndarray:
    """[L,2,KVH,D] absmax -> scales: key channel pairs (i, i + R/2) share their largest norm; all times MARGIN."""
    bound = absmax.astype(np.float32).copy()
    half = rotary_dims // 2
    keys = bound[:, 0]                                                              # [L,KVH,D] view
    pair = np.hypot(keys[..., :half], keys[..., half:rotary_dims])                 # [L,KVH,R/2]
    keys[..., :half], keys[..., half:rotary_dims] = pair, pair
    return np.maximum(bound * MARGIN / INT8_MAX, np.finfo(np.float32).tiny)        # an all-zero channel: any > 0


# ---- the rewrite --------------------------------------------------------------------------------
def write_int8_cache(directory: Path, scales: np.ndarray) -> None:
    """Turn the fused decoder in `directory` into one with an int8 cache (decoder.onnx and manifest.json)."""
    manifest = Manifest.load(directory)
    KVCacheType.INT8.check(manifest.attention)
    path = manifest.path("decoder")
    model = onnx.load(str(path), load_external_data=False)  # weights stay in their .data file, untouched
    _quantise_graph(model.graph, scales)
    onnx.save(model, str(path))
    _write_manifest(manifest)


def _quantise_graph(graph: onnx.GraphProto, scales: np.ndarray) -> None:
    for value in [*graph.input, *graph.output]:
        if value.name.startswith(CACHE_PREFIXES):
            value.type.tensor_type.elem_type = TensorProto.INT8
    nodes = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    if len(nodes) != len(scales):
        raise UserError(f"decoder.onnx has {len(nodes)} GroupQueryAttention nodes for {len(scales)} layers; "
                        "re-export with --attention fused")
    for node in nodes:
        layer = int(node.input[3].split(".")[1])                                  # past_key_values.{layer}.key
        names = [f"/decoder/layers.{layer}/attn/{kind}_scale" for kind in ("k", "v")]
        for kind, name in enumerate(names):
            graph.initializer.append(numpy_helper.from_array(scales[layer, kind][None, :, None, :], name))
        inputs = list(node.input) + [""] * (GQA_K_SCALE - len(node.input)) + names   # [1,KVH,1,D] each
        del node.input[:]
        node.input.extend(inputs)
        node.attribute.extend([helper.make_attribute("k_quant_type", "PER_CHANNEL"),
                               helper.make_attribute("v_quant_type", "PER_CHANNEL"),
                               helper.make_attribute("kv_cache_bit_width", 8)])


def _write_manifest(manifest: Manifest) -> None:
    def retyped(tensors):
        return tuple(dataclasses.replace(t, dtype="int8") if t.name.startswith(CACHE_PREFIXES) else t
                     for t in tensors)
    decoder = manifest.parts["decoder"]
    parts = {**manifest.parts, "decoder": PartSpec(decoder.file, retyped(decoder.inputs), retyped(decoder.outputs))}
    updated = dataclasses.replace(manifest, parts=parts, kv_cache=KVCacheType.INT8.value)
    (manifest.root / MANIFEST_FILE).write_text(json.dumps(updated.to_dict(), indent=2) + "\n")

