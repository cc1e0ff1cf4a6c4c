"""Tiny fixtures for the runtime tests: a byte-level tokenizer, a scripted fake Engine, a tiny export dir.

The tiny export obeys the export-directory contract with hand-built graphs (no torch):

  vision:    pixel_values [N,3,8,8] -> Reshape [N,P=4,Dv=48] -> *2 -> image_features
  projector: image_features @ Wp [Dv,H] -> image_embeds [N,P,H]
  embed:     Gather(table [V,H], input_ids) -> inputs_embeds [B,S,H]
  decoder:   new = Transpose(Reshape(inputs_embeds, [B,S,KVH,D]), [0,2,1,3])          [B,KVH,S,D]
             present.i.key = Concat(past.i.key, new * KEY_SCALE[i]), value with VALUE_SCALE[i]   [B,KVH,P+S,D]
             logits = Reshape(sum_i sum_positions(present.i.key + present.i.value), [B,H]) @ W
                      + MASK_COEF * sum(attention_mask) + POS_COEF * max(position_ids)   [B,V]
  So logits after t positions = (sum of scales) * (sum of all embeds so far) @ W + MASK_COEF*t + POS_COEF*(t-1),
  which only comes out right if the runtime feeds every present back as the next past.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from runtime.preprocess import ImageSpec

VOCAB = 257  # 256 bytes + <|endoftext|>
EOS = 256
KVH, HEAD_DIM = 2, 4
HIDDEN = KVH * HEAD_DIM
PATCHES, VISION_DIM, IMAGE_SIDE = 4, 48, 8
KEY_SCALE, VALUE_SCALE = (1.0, 0.5), (0.25, 0.125)
MASK_COEF, POS_COEF = 0.01, 0.001
TINY_SPEC = ImageSpec(shortest_edge=IMAGE_SIDE, crop_size=(IMAGE_SIDE, IMAGE_SIDE))


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what a ByteLevel pre-tokenizer emits)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    extra = 0
    table = {}
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_tokenizer():
    """Byte-level BPE without merges: token id == byte value, <|endoftext|> = 256."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    assert tok.token_to_id("<|endoftext|>") == EOS
    return tok


def byte_ids(text: str) -> list[int]:
    return list(text.encode("utf-8"))


class FakeEngine:
    """Engine whose logits follow a script: prefill -> script[0], k-th decode -> script[k]; records its inputs.

    embed_tokens(id) = [id, 0, 0, 1]; visual token p of image n = [-(p+1), mean of image n, 0, 2].
    """
    hidden_size = 4

    def __init__(self, script: list[int], vocab: int = VOCAB, margin: float = 10.0):
        self.script, self.vocab, self.margin = script, vocab, margin
        self.prefill_inputs: list[np.ndarray] = []
        self.decoded: list[int] = []
        self.encoded: list[np.ndarray] = []
        self.closed = False

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        self.encoded.append(pixel_values)
        n = pixel_values.shape[0]
        out = np.zeros((n, PATCHES, self.hidden_size), np.float32)
        out[:, :, 0] = -(np.arange(PATCHES) + 1)
        out[:, :, 1] = pixel_values.reshape(n, -1).mean(axis=1)[:, None]
        out[:, :, 3] = 2
        return out

    def embed_tokens(self, token_ids: np.ndarray) -> np.ndarray:
        assert token_ids.dtype == np.int64 and token_ids.ndim == 1
        out = np.zeros((len(token_ids), self.hidden_size), np.float32)
        out[:, 0], out[:, 3] = token_ids, 1
        return out

    def prefill(self, inputs_embeds: np.ndarray) -> np.ndarray:
        self.prefill_inputs.append(inputs_embeds.copy())
        self.decoded = []
        return self._logits(0)

    def decode(self, token_id: int) -> np.ndarray:
        self.decoded.append(token_id)
        return self._logits(len(self.decoded))

    def close(self) -> None:
        self.closed = True

    def _logits(self, step: int) -> np.ndarray:
        logits = np.zeros(self.vocab, np.float32)
        logits[self.script[min(step, len(self.script) - 1)]] = self.margin
        return logits


# ---- tiny export directory ------------------------------------------------------------------------------

def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "table": rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32),
        "projector": rng.standard_normal((VISION_DIM, HIDDEN)).astype(np.float32) * 0.1,
        "lm_head": rng.standard_normal((HIDDEN, VOCAB)).astype(np.float32),
    }


def expected_logits(all_embeds: np.ndarray, weights: dict[str, np.ndarray]) -> np.ndarray:
    """The tiny decoder's logits [V] after all positions `all_embeds` [t,H] are in the cache."""
    t = all_embeds.shape[0]
    scale = sum(KEY_SCALE) + sum(VALUE_SCALE)
    return scale * all_embeds.sum(0) @ weights["lm_head"] + MASK_COEF * t + POS_COEF * (t - 1)


def expected_visual(pixel_values: np.ndarray, weights: dict[str, np.ndarray]) -> np.ndarray:
    n = pixel_values.shape[0]
    return (pixel_values.reshape(n, PATCHES, VISION_DIM) * 2) @ weights["projector"]


def _model(nodes, inputs, outputs, initializers):
    from onnx import helper

    graph = helper.make_graph(nodes, "tiny", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _io(name, elem, shape):
    from onnx import helper

    return helper.make_tensor_value_info(name, elem, shape)


def _const(name, array):
    from onnx import numpy_helper

    return numpy_helper.from_array(np.asarray(array), name)


def _parts(float_type: np.dtype, w: dict[str, np.ndarray], num_layers: int):
    """(part name -> onnx model) for the graphs in the module docstring."""
    from onnx import TensorProto, helper

    f = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16}[np.dtype(float_type)]
    n = helper.make_node
    c = lambda name, a: _const(name, np.asarray(a, dtype=float_type))  # noqa: E731
    vision = _model(
        [n("Reshape", ["pixel_values", "shape"], ["r"], name="/vision/Reshape"),
         n("Mul", ["r", "two"], ["image_features"], name="/vision/Mul")],
        [_io("pixel_values", f, ["N", 3, IMAGE_SIDE, IMAGE_SIDE])],
        [_io("image_features", f, ["N", PATCHES, VISION_DIM])],
        [_const("shape", np.array([0, PATCHES, VISION_DIM], np.int64)), c("two", 2.0)])
    projector = _model(
        [n("MatMul", ["image_features", "w"], ["image_embeds"], name="/projector/MatMul")],
        [_io("image_features", f, ["N", PATCHES, VISION_DIM])], [_io("image_embeds", f, ["N", PATCHES, HIDDEN])],
        [c("w", w["projector"])])
    embed = _model(
        [n("Gather", ["table", "input_ids"], ["inputs_embeds"], name="/embed/Gather")],
        [_io("input_ids", TensorProto.INT64, ["B", "S"])], [_io("inputs_embeds", f, ["B", "S", HIDDEN])],
        [c("table", w["table"])])
    return {"vision": vision, "projector": projector, "embed": embed,
            "decoder": _decoder(f, float_type, w, num_layers)}


def _decoder(f, float_type, w, num_layers):
    from onnx import TensorProto, helper

    n = helper.make_node
    c = lambda name, a: _const(name, np.asarray(a, dtype=float_type))  # noqa: E731
    nodes = [
        n("Reshape", ["inputs_embeds", "kv_shape"], ["split"], name="/decoder/Reshape"),
        n("Transpose", ["split"], ["new"], perm=[0, 2, 1, 3], name="/decoder/Transpose"),  # [B,KVH,S,D]
    ]
    inputs = [_io("inputs_embeds", f, ["B", "S", HIDDEN]), _io("attention_mask", TensorProto.INT64, ["B", "T"]),
              _io("position_ids", TensorProto.INT64, ["B", "S"])]
    outputs, inits, sums = [], [_const("kv_shape", np.array([0, 0, KVH, HEAD_DIM], np.int64)),
                                _const("axis2", np.array([2], np.int64)), _const("axis1", np.array([1], np.int64)),
                                _const("h_shape", np.array([0, HIDDEN], np.int64)), c("w", w["lm_head"]),
                                c("mask_coef", MASK_COEF), c("pos_coef", POS_COEF)], []
    kv_shape = ["B", KVH, "P", HEAD_DIM]
    for i in range(num_layers):
        for kind, scales in (("key", KEY_SCALE), ("value", VALUE_SCALE)):
            past, present, p = f"past_key_values.{i}.{kind}", f"present.{i}.{kind}", f"/decoder/layers.{i}/{kind}"
            inputs.append(_io(past, f, kv_shape))
            outputs.append(_io(present, f, ["B", KVH, "P+S", HEAD_DIM]))
            inits.append(c(f"{p}/scale", scales[i]))
            nodes += [n("Mul", ["new", f"{p}/scale"], [f"{p}/scaled"], name=f"{p}/Mul"),
                      n("Concat", [past, f"{p}/scaled"], [present], axis=2, name=f"{p}/Concat"),
                      n("ReduceSum", [present, "axis2"], [f"{p}/sum"], keepdims=0, name=f"{p}/ReduceSum")]
            sums.append(f"{p}/sum")
    nodes += [
        n("Sum", sums, ["total"], name="/decoder/Sum"),  # [B,KVH,D]
        n("Reshape", ["total", "h_shape"], ["flat"], name="/decoder/Flatten"),  # [B,H]
        n("MatMul", ["flat", "w"], ["head"], name="/decoder/lm_head/MatMul"),  # [B,V]
        n("ReduceSum", ["attention_mask", "axis1"], ["mask_len"], keepdims=1, name="/decoder/mask/ReduceSum"),
        n("Cast", ["mask_len"], ["mask_f"], to=f, name="/decoder/mask/Cast"),
        n("Mul", ["mask_f", "mask_coef"], ["mask_term"], name="/decoder/mask/Mul"),
        n("ReduceMax", ["position_ids"], ["pos_max"], axes=[1], keepdims=1, name="/decoder/pos/ReduceMax"),
        n("Cast", ["pos_max"], ["pos_f"], to=f, name="/decoder/pos/Cast"),
        n("Mul", ["pos_f", "pos_coef"], ["pos_term"], name="/decoder/pos/Mul"),
        n("Add", ["head", "mask_term"], ["with_mask"], name="/decoder/Add_mask"),
        n("Add", ["with_mask", "pos_term"], ["logits"], name="/decoder/Add_pos"),
    ]
    return _model(nodes, inputs, [_io("logits", f, ["B", VOCAB])] + outputs, inits)


def _tensor_specs(values, dtype_of) -> list[dict]:
    out = []
    for v in values:
        dims = [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        out.append({"name": v.name, "shape": dims, "dtype": dtype_of(v.type.tensor_type.elem_type)})
    return out


def manifest_dict(models: dict, num_layers: int, precision: str, max_positions: int) -> dict:
    from onnx import helper

    dtype_of = lambda elem: np.dtype(helper.tensor_dtype_to_np_dtype(elem)).name  # noqa: E731
    parts = {name: {"file": f"{name}.onnx", "inputs": _tensor_specs(m.graph.input, dtype_of),
                    "outputs": _tensor_specs(m.graph.output, dtype_of)} for name, m in models.items()}
    return {
        "format_version": 1, "model_type": "moe_llava_stablelm", "config": {"hidden_size": HIDDEN},
        "precision": precision, "moe_impl": "portable", "attention": "unfused", "kv_cache": "float",
        "template": "stablelm",
        "tokenizer": "tokenizer.json",
        "special_tokens": {"bos_token_id": None, "eos_token_id": EOS, "pad_token_id": None,
                           "image_token_index": -200},
        "image": TINY_SPEC.to_dict(),
        "decoder": {"num_layers": num_layers, "num_kv_heads": KVH, "head_dim": HEAD_DIM, "hidden_size": HIDDEN,
                    "vocab_size": VOCAB, "max_positions": max_positions},
        "parts": parts, "source": {"test": True}, "versions": {},
    }


def build_tiny_export(out: Path, dtype=np.float32, num_layers: int = 2, max_positions: int = 512,
                      seed: int = 0) -> dict[str, np.ndarray]:
    """Write a contract-conforming export dir to `out`; returns the fp32 weights for expected values."""
    import onnx

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = _weights(seed)
    models = _parts(np.dtype(dtype), weights, num_layers)
    for name, model in models.items():
        onnx.checker.check_model(model)
        onnx.save(model, str(out / f"{name}.onnx"))
    precision = "fp16" if np.dtype(dtype) == np.float16 else "fp32"
    (out / "manifest.json").write_text(json.dumps(manifest_dict(models, num_layers, precision, max_positions),
                                                  indent=1))
    byte_tokenizer().save(str(out / "tokenizer.json"))
    (out / "validation.json").write_text("{}")
    return weights
