"""Device memory of a TensorRT deployment, from config.json alone (no weights, no TensorRT, no torch):
`moe-export --model DIR --target tensorrt --precision P --gpu BOARD --max-seq N --memory-plan [--json]`.

Parts and how each is counted (W = weight matrices, quantised at the precision; everything else - biases, norms,
position embeddings - in fp16, routers in fp32 as the export keeps them):
  vision tower    the layers up to mm_vision_select_layer (the engine prunes the rest) + embeddings
  projector       its linear layers
  embedding table V x H (int8/int4: a dequantised Gather)
  decoder dense   attention of every layer, the dense MLPs of non-MoE layers, norms
  MoE experts     E experts per MoE layer (fc1, fc2) + the fp32 routers
  lm_head         V x H
  fp16 2 bytes/weight; int8 1 byte + an fp16 scale per output row; int4 half a byte + an fp16 scale per group of
  --group-size (64/128) inputs.
KV cache and the MoE plugin's workspace come from runtime/tensorrt/memory.py, the arithmetic the TensorRT
backend allocates with. TensorRT's activations are estimated (see decoder_activation_bytes).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from moe_llava.config import MoELlavaConfig
from moe_llava.tower_specs import KNOWN_TOWERS
from runtime.errors import UserError
from runtime.tensorrt.memory import KV_KINDS, KVMode, kv_cache_bytes, kv_mode_for, moe_workspace_bytes

from .boards import GIB, Board

Matrix = tuple[int, int, int]  # (count, rows = outputs, cols = inputs)


class WeightPrecision(str, Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"
    INT4 = "int4"

    def matrix_bytes(self, rows: int, cols: int, group: int) -> int:
        if self is WeightPrecision.INT8:
            return rows * cols + 2 * rows
        if self is WeightPrecision.INT4:
            return rows * math.ceil(cols / 2) + 2 * rows * math.ceil(cols / group)
        return rows * cols * (4 if self is WeightPrecision.FP32 else 2)

    @property
    def activation_itemsize(self) -> int:
        return 4 if self is WeightPrecision.FP32 else 2  # quantised graphs compute in fp16


@dataclass(frozen=True)
class PartWeights:
    matrices: tuple[Matrix, ...]
    other_params: int = 0  # fp16
    fp32_params: int = 0  # routers

    @property
    def params(self) -> int:
        return sum(n * r * c for n, r, c in self.matrices) + self.other_params + self.fp32_params

    def nbytes(self, precision: WeightPrecision, group: int) -> int:
        other = self.other_params * (4 if precision is WeightPrecision.FP32 else 2)
        return sum(n * precision.matrix_bytes(r, c, group) for n, r, c in self.matrices) + other + 4 * self.fp32_params


@dataclass(frozen=True)
class ModelShape:
    """The sizes the plan needs, read from a released config.json's field names."""
    family: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    moe_layers: tuple[int, ...]
    experts: tuple[int, ...]  # per MoE layer
    top_k: int
    ffn: int  # FFN width I of the dense MLPs and of each expert
    vocab: int
    gated: bool  # SwiGLU: fc1 holds gate and up (2I rows)

    @classmethod
    def from_config(cls, cfg: MoELlavaConfig) -> ModelShape:
        b, family = cfg.backbone, cfg.family
        if family not in ("stablelm", "phi", "qwen"):
            raise UserError(f"model_type {cfg.model_type!r}: the memory plan knows stablelm, phi and qwen")
        heads = int(b["num_attention_heads"])
        head_dim = int(b.get("kv_channels") or cfg.hidden_size // heads)
        ffn = int(b["intermediate_size"]) // (2 if family == "qwen" else 1)  # Qwen-1 counts w1 + w2
        moe = tuple(cfg.moe_layers)
        return cls(family, cfg.hidden_size, heads, int(b.get("num_key_value_heads") or heads), head_dim,
                   cfg.num_layers, moe, tuple(cfg.moe.experts_of(i) for i in moe), int(cfg.moe.top_k), ffn,
                   cfg.vocab_size, family != "phi")

    @property
    def fc1_rows(self) -> int:
        return 2 * self.ffn if self.gated else self.ffn

    def mlp(self, count: int) -> PartWeights:
        matrices = ((count, self.fc1_rows, self.hidden), (count, self.hidden, self.ffn))
        bias = count * (self.ffn + self.hidden) if self.family == "phi" else 0
        return PartWeights(matrices, bias)

    def attention(self) -> PartWeights:
        h, kv, n = self.hidden, self.kv_heads * self.head_dim, self.layers
        q = self.heads * self.head_dim
        norms = {"stablelm": 4 * h, "phi": 2 * h, "qwen": 2 * h}[self.family]  # per layer
        bias = {"stablelm": q + 2 * kv, "phi": q + 2 * kv + h, "qwen": q + 2 * kv}[self.family]
        final_norm = h if self.family == "qwen" else 2 * h
        return PartWeights(((n, q, h), (n, kv, h), (n, kv, h), (n, h, q)), n * (norms + bias) + final_norm)

    def experts_part(self) -> PartWeights:
        mlps = [self.mlp(e) for e in self.experts]
        return PartWeights(tuple(m for p in mlps for m in p.matrices), sum(p.other_params for p in mlps),
                           sum(self.hidden * e for e in self.experts))

    def dense_part(self) -> PartWeights:
        attention, dense = self.attention(), self.mlp(self.layers - len(self.moe_layers))
        return PartWeights(attention.matrices + dense.matrices, attention.other_params + dense.other_params)


def tower_weights(cfg: MoELlavaConfig) -> tuple[PartWeights, dict]:
    """The vision tower's weights as far as the selected layer, and its config."""
    tower = cfg.image_tower_config or (KNOWN_TOWERS[cfg.mm_image_tower].config
                                       if cfg.mm_image_tower in KNOWN_TOWERS else None)
    if tower is None:
        raise UserError(f"vision tower {cfg.mm_image_tower!r} is not a built-in one and config.json embeds no "
                        "image_tower_config: the plan cannot size it")
    t = tower.get("vision_config", tower)
    w, inner, patch, side = t["hidden_size"], t["intermediate_size"], t["patch_size"], t["image_size"]
    siglip = "siglip" in str(t.get("model_type", "")) or cfg.mm_image_tower.startswith("google/siglip")
    used = t["num_hidden_layers"] + 1 + cfg.mm_vision_select_layer if cfg.mm_vision_select_layer < 0 \
        else cfg.mm_vision_select_layer
    patches = (side // patch) ** 2
    layer_other = 4 * w + 4 * w + inner + w  # two LayerNorms, q/k/v/o biases, fc1/fc2 biases
    embeddings = (patches + (0 if siglip else 1)) * w + (w if siglip else w + 2 * w)  # positions, conv bias or CLS + pre-norm
    matrices = ((used * 4, w, w), (used, inner, w), (used, w, inner), (1, w, 3 * patch * patch))
    return PartWeights(matrices, used * layer_other + embeddings), t


def projector_weights(cfg: MoELlavaConfig) -> PartWeights:
    kind, h, v = cfg.image_projector_type, cfg.hidden_size, cfg.mm_hidden_size
    depth = 1 if kind == "linear" else int(kind.removeprefix("mlp").removesuffix("x_gelu"))
    return PartWeights(((1, h, v),) + (((depth - 1, h, h),) if depth > 1 else ()), depth * h)


@dataclass(frozen=True)
class PlanRequest:
    precision: WeightPrecision
    board: Board
    max_seq: int
    max_batch: int = 1
    group_size: int = 128


def plan_memory(cfg: MoELlavaConfig, request: PlanRequest) -> dict:
    """Every figure in bytes: {"weights": {part: bytes}, "kv_cache", "moe_workspace", "activations",
    "runtime_buffers", "total", "usable", "fits", ...}."""
    shape, p, g = ModelShape.from_config(cfg), request.precision, request.group_size
    vision, tower = tower_weights(cfg)
    embed = PartWeights(((1, shape.vocab, shape.hidden),))
    parts = {"vision tower": vision, "projector": projector_weights(cfg), "embedding table": embed,
             "decoder dense": shape.dense_part(), "MoE experts": shape.experts_part(), "lm_head": embed}
    weights = {name: part.nbytes(p, g) for name, part in parts.items()}
    a, tokens = p.activation_itemsize, request.max_batch * request.max_seq
    mode = kv_mode_for(shape.kv_heads, shape.head_dim, a)  # what the TensorRT build will choose
    kv = kv_cache_bytes(shape.layers, shape.kv_heads, shape.head_dim, request.max_seq, a, mode)
    workspace = moe_workspace_bytes(tokens, max(shape.experts, default=0), shape.top_k, shape.hidden, shape.ffn, a) \
        if shape.moe_layers else 0
    activations = max(decoder_activation_bytes(shape, request.max_batch, request.max_seq, a, mode),
                      vision_activation_bytes(tower, request.max_batch, a))
    buffers = runtime_buffer_bytes(shape, tower, request, a)
    total = sum(weights.values()) + kv + workspace + activations + buffers
    return {"precision": p.value, "group_size": g if p is WeightPrecision.INT4 else None,
            "max_seq": request.max_seq, "max_batch": request.max_batch, "board": request.board.name,
            "board_memory": int(request.board.memory_gib * GIB), "reserve": int(request.board.reserve_gib * GIB),
            "weights": weights, "params": {name: part.params for name, part in parts.items()},
            "kv_cache": kv, "kv_mode": mode.value, "kv_copies": mode.copies, "moe_workspace": workspace, "activations": activations, "runtime_buffers": buffers,
            "total": total, "usable": request.board.usable_bytes, "fits": total <= request.board.usable_bytes}


def decoder_activation_bytes(shape: ModelShape, batch: int, seq: int, itemsize: int, mode: KVMode) -> int:
    """TensorRT's activations for the prefill profile's max shapes (B x S tokens), an upper bound: TensorRT
    reuses activation memory layer to layer, so one layer's live tensors count - the residual stream and three
    [T,H] temporaries, q/k/v, the attention scores [B,heads,S,S] as if attention were not fused (a fused MHA
    kernel needs none of it) and the dense MLP's [T,fc1 rows] - plus the fp32 logits of the last position. The
    KV-append graph adds one layer's head-major past and concatenated key/value at max_seq (they are inside the
    engine there, not in the cache)."""
    t = batch * seq
    kv = shape.kv_heads * shape.head_dim
    per_layer = t * (4 * shape.hidden + shape.heads * shape.head_dim + 2 * kv + shape.fc1_rows)
    scores = batch * shape.heads * seq * seq
    append = 2 * KV_KINDS * batch * seq * kv if mode is KVMode.APPEND else 0
    return (per_layer + scores + append) * itemsize + batch * shape.vocab * 4


def vision_activation_bytes(tower: dict, images: int, itemsize: int) -> int:
    """The same bound for the vision engine at --max-batch images."""
    tokens = (tower["image_size"] // tower["patch_size"]) ** 2 + 1
    w, heads = tower["hidden_size"], tower.get("num_attention_heads", 16)
    return images * (tokens * (7 * w + tower["intermediate_size"]) + heads * tokens * tokens) * itemsize


def runtime_buffer_bytes(shape: ModelShape, tower: dict, request: PlanRequest, itemsize: int) -> int:
    """What the TensorRT backend allocates besides the KV cache (runtime/tensorrt/decoder.py, encoders.py):
    decoder and embed inputs/outputs [M,H], ids/mask/positions [M] (int64) and the 256-byte position table,
    logits, and the vision engine's pixels, features and image embeddings at --max-batch."""
    m, h = request.max_seq, shape.hidden
    side, patch = tower["image_size"], tower["patch_size"]
    visual = request.max_batch * (side // patch) ** 2
    return (2 * m * h * itemsize + 3 * m * 8 + m * 256 + 4 * shape.vocab * 2
            + request.max_batch * 3 * side * side * itemsize + visual * (tower["hidden_size"] + h) * itemsize)


def load_config(model_dir: str | Path) -> MoELlavaConfig:
    """config.json of a checkpoint directory; nothing else is read."""
    return MoELlavaConfig.from_json(Path(model_dir) / "config.json")
