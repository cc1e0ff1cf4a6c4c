"""Attention lowering (`--attention fused | unfused`): the decoder's attention as one ONNX Runtime contrib op.

Shapes: B batch, S new positions, n cached positions, T = n + S, M cache buffer length, H hidden, NH query heads,
KVH kv heads, D head dim, R rotary dims (a prefix of D: 25 % StableLM, 40 % Phi-2, 100 % Qwen-1).

unfused  what transformers traces: per layer the rotary as Slice/Concat/Neg/Mul, MatMul-Softmax-MatMul and a
         Concat of past and new key/value (present [B,KVH,T,D] is a new tensor every step).
fused    during export each attention module is swapped for `ExportAttention`, which calls the custom op
         `moe_llava::gqa`; its `ort` translation is com.microsoft.GroupQueryAttention:

           x -> qkv Linear (q|k|v weights and biases concatenated: one MatMul)  [B,S,(NH+2KVH)*D]
             -> GroupQueryAttention(packed qkv, past_key, past_value, seqlens_k, total_sequence_length,
                                    cos_cache, sin_cache, position_ids)        rotary + causal attention
             -> o_proj                                                          [B,S,H]
           seqlens_k = ReduceSum(attention_mask) - 1 [B] int32, total_sequence_length = T (scalar int32)

         The rotary runs inside the op when R/2 is a multiple of 8 (onnxruntime's cos_cache rule: true for the
         released StableLM-1.6B R=16, Phi-2 R=32, Qwen-1 R=128); otherwise transformers' own rotary is traced in
         front and the op gets rotated q/k (do_rotary=0). The op rotates the first R dims rotate-half style
         (rotary_interleaved=0, as transformers) and passes the rest through - checked against PyTorch in
         tests/export/test_attention_lowering.py.
         The KV cache: past_key [B,KVH,M,D]. When the caller binds present_key to the same buffer (M = the
         context length), the op writes the S new positions in place and reads the first T - no copy; given a past
         of exactly n positions it returns present [B,KVH,T,D] like the unfused graph, so validation and
         calibration feed both graphs alike.
The PyTorch model keeps transformers' modules; only the export copy is swapped (as MoE layers are).
"""
from __future__ import annotations

from enum import Enum

import torch
from torch import nn

from runtime.errors import UserError
from moe_llava.upcast import compute_dtype, compute_in, stored

from .contrib_schema import register_schema

ROTARY_HALF_MULTIPLE = 8  # onnxruntime GroupQueryAttention: cos_cache.shape[1] % 8 == 0


class AttentionImpl(str, Enum):
    AUTO = "auto"
    FUSED = "fused"
    UNFUSED = "unfused"

    def resolve(self, moe_impl: str) -> "AttentionImpl":
        """auto: fused where the graph targets onnxruntime (`ort`), standard ops for portable / plugin."""
        if self is AttentionImpl.AUTO:
            return AttentionImpl.FUSED if moe_impl == "ort" else AttentionImpl.UNFUSED
        if self is AttentionImpl.FUSED and moe_impl != "ort":
            raise UserError(f"--attention fused needs --moe-impl ort (GroupQueryAttention is an onnxruntime op); "
                            f"--moe-impl {moe_impl} keeps standard-op attention: use --attention unfused or auto")
        return self


# ---- the op -------------------------------------------------------------------------------------
@torch.library.custom_op("moe_llava::gqa", mutates_args=())
def gqa_op(qkv: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor, attention_mask: torch.Tensor,
           position_ids: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor, num_heads: int,
           kv_heads: int, scale: float, rotary: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eager semantics of GroupQueryAttention for one unpadded sequence: (out [B,S,NH*D], present_key, present_value).

    past holds n = T - S positions ([B,KVH,n,D], present [B,KVH,T,D]) or is a buffer of M >= T positions
    (present is that buffer with positions n..T-1 written).
    """
    b, s, _ = qkv.shape
    d = past_key.shape[-1]
    q, k, v = (t.reshape(b, s, -1, d).transpose(1, 2)                        # [B,heads,S,D]
               for t in qkv.split([num_heads * d, kv_heads * d, kv_heads * d], dim=-1))
    if rotary:
        q, k = (rotate_prefix(t, cos_cache, sin_cache, position_ids) for t in (q, k))
    total = attention_mask.shape[1]
    cached = total - s
    keys = torch.cat([past_key[:, :, :cached], k], dim=2)                      # [B,KVH,T,D]
    values = torch.cat([past_value[:, :, :cached], v], dim=2)
    causal = torch.ones(s, total, dtype=torch.bool).tril(diagonal=cached)      # [S,T]
    groups = num_heads // kv_heads
    out = nn.functional.scaled_dot_product_attention(
        q, keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1), attn_mask=causal, scale=scale)
    out = out.transpose(1, 2).reshape(b, s, num_heads * d)                     # [B,S,NH*D]
    if past_key.shape[2] < total:
        return out, keys, values
    present_key, present_value = past_key.clone(), past_value.clone()
    present_key[:, :, cached:total], present_value[:, :, cached:total] = k, v
    return out, present_key, present_value


@gqa_op.register_fake
def _(qkv, past_key, past_value, attention_mask, position_ids, cos_cache, sin_cache, num_heads, kv_heads, scale,
      rotary):
    b, s, _ = qkv.shape
    # present declared with past's shape: the shared-buffer case the runtime binds
    return qkv.new_empty(b, s, num_heads * past_key.shape[-1]), torch.empty_like(past_key), torch.empty_like(past_value)


def rotate_prefix(x: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor,
                  position_ids: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary on the first R = 2 * cos_cache.shape[1] dims of x [B,heads,S,D]."""
    r = 2 * cos_cache.shape[1]
    cos = torch.cat([cos_cache[position_ids]] * 2, dim=-1)[:, None]            # [B,1,S,R]
    sin = torch.cat([sin_cache[position_ids]] * 2, dim=-1)[:, None]
    x_rot, x_pass = x[..., :r], x[..., r:]
    half = torch.cat([-x_rot[..., r // 2:], x_rot[..., : r // 2]], dim=-1)
    return torch.cat([x_rot * cos + half * sin, x_pass], dim=-1)


# ---- the export module --------------------------------------------------------------------------
class KVSlots:
    """The decoder call's cache inputs and attention mask, shared by DecoderPart and its ExportAttention layers.

    transformers' decoder layers pass no free-form arguments to their attention, so the part loads the
    per-call tensors here before running the model and collects the presents after.
    """

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.load((), None, None)

    def load(self, past, attention_mask, position_ids) -> None:
        self.past, self.attention_mask, self.position_ids = past, attention_mask, position_ids
        self.presents: list = [None] * (2 * self.num_layers)

    def put(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        self.presents[2 * layer], self.presents[2 * layer + 1] = key, value


class ExportAttention(nn.Module):
    """Stand-in for a transformers StableLm / Phi / Qwen2 attention module: fused QKV, then `moe_llava::gqa`."""

    def __init__(self, attn: nn.Module, layer: int, slots: KVSlots, cos_sin: tuple[torch.Tensor, torch.Tensor]):
        super().__init__()
        if getattr(attn, "qk_layernorm", False):
            raise UserError("qk_layernorm attention has no fused lowering; export with --attention unfused")
        self.layer, self.slots = layer, slots
        config = attn.config
        self.num_heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim, self.scale = attn.head_dim, float(attn.scaling)
        self.rotary_dims = getattr(attn, "rotary_ndims", attn.head_dim)
        self.fused_rotary = (self.rotary_dims // 2) % ROTARY_HALF_MULTIPLE == 0
        self.qkv = _concat_linear([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o_proj = attn.o_proj if hasattr(attn, "o_proj") else attn.dense
        self.register_buffer("cos_cache", cos_sin[0], persistent=False)       # [M,R/2]
        self.register_buffer("sin_cache", cos_sin[1], persistent=False)

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, **_) -> tuple[torch.Tensor, None]:
        qkv = self.qkv(hidden_states)                                           # [B,S,(NH+2KVH)*D]
        if not self.fused_rotary:
            qkv = self._rotate_outside(qkv, *position_embeddings)
        past_key, past_value = self.slots.past[2 * self.layer: 2 * self.layer + 2]
        out, present_key, present_value = gqa_op(
            qkv, past_key, past_value, self.slots.attention_mask, self.slots.position_ids, self.cos_cache,
            self.sin_cache, self.num_heads, self.kv_heads, self.scale, self.fused_rotary)
        self.slots.put(self.layer, present_key, present_value)
        return self.o_proj(out), None

    def _rotate_outside(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """transformers' rotary on q and k (traced as standard ops); v untouched."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
        b, s, _ = qkv.shape
        d, r = self.head_dim, self.rotary_dims
        q, k, v = qkv.split([self.num_heads * d, self.kv_heads * d, self.kv_heads * d], dim=-1)
        q, k = (t.reshape(b, s, -1, d).transpose(1, 2) for t in (q, k))          # [B,heads,S,D]
        q_rot, k_rot = apply_rotary_pos_emb(q[..., :r], k[..., :r], cos, sin)
        q, k = (torch.cat([rot, t[..., r:]], dim=-1).transpose(1, 2).reshape(b, s, -1)
                for rot, t in ((q_rot, q), (k_rot, k)))
        return torch.cat([q, k, v], dim=-1)


def _concat_linear(linears: list[nn.Linear]) -> nn.Linear:
    """One Linear whose output is the given Linears' outputs side by side (biases zero where absent), stored
    and computed as they are (upcast.py)."""
    weights = [stored(lin, "weight") for lin in linears]
    has_bias = any(lin.bias is not None for lin in linears)
    fused = nn.Linear(weights[0].shape[1], sum(w.shape[0] for w in weights), bias=has_bias,
                      dtype=weights[0].dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat(weights))                                  # [(NH+2KVH)*D,H]
        if has_bias:
            fused.bias.copy_(torch.cat([stored(lin, "bias") if lin.bias is not None
                                        else torch.zeros(w.shape[0], dtype=w.dtype)
                                        for lin, w in zip(linears, weights)]))
    return compute_in(fused, compute_dtype(linears[0]))


def rotary_caches(lm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [M,R/2] from the model's own rotary module, M = its context length (max_position_embeddings)."""
    positions = torch.arange(lm.config.max_position_embeddings)[None]          # [1,M]
    probe = torch.zeros(1, dtype=compute_dtype(lm))
    with torch.no_grad():
        cos, sin = lm.model.rotary_emb(probe, position_ids=positions)           # [1,M,R] halves repeated
    half = cos.shape[-1] // 2
    return cos[0, :, :half].contiguous(), sin[0, :, :half].contiguous()


def swap_in_export_attention(lm: nn.Module) -> KVSlots:
    """Replace every decoder layer's attention by an ExportAttention (in place); returns their shared slots."""
    layers = lm.model.layers
    slots = KVSlots(len(layers))
    cos_sin = rotary_caches(lm)
    for i, layer in enumerate(layers):
        layer.self_attn = ExportAttention(layer.self_attn, i, slots, cos_sin)
    return slots


# ---- ONNX translation ---------------------------------------------------------------------------
def register_gqa_schema() -> None:
    inputs = [("query", "T", False), ("key", "T", True), ("value", "T", True), ("past_key", "T", True),
              ("past_value", "T", True), ("seqlens_k", "M", False), ("total_sequence_length", "M", False),
              ("cos_cache", "T", True), ("sin_cache", "T", True), ("position_ids", "P", True)]
    register_schema("com.microsoft", "GroupQueryAttention", inputs,
                    [("num_heads", "INT"), ("kv_num_heads", "INT"), ("scale", "FLOAT"), ("do_rotary", "INT"),
                     ("rotary_interleaved", "INT")],
                    outputs=("output", "present_key", "present_value"),
                    types={"T": ["tensor(float)", "tensor(float16)"], "M": ["tensor(int32)"],
                           "P": ["tensor(int64)"]})


def translation_table() -> dict:
    register_gqa_schema()
    return {torch.ops.moe_llava.gqa.default: _ort_gqa}


def _ort_gqa(qkv, past_key, past_value, attention_mask, position_ids, cos_cache, sin_cache, num_heads: int,
             kv_heads: int, scale: float, rotary: bool):
    from onnx import TensorProto
    from onnxscript import opset18 as op
    from onnxscript.values import Opset
    msft = Opset("com.microsoft", 1)
    int32 = TensorProto.INT32
    seqlens_k = op.Cast(op.Sub(op.ReduceSum(attention_mask, [1], keepdims=0), 1), to=int32)          # [B]
    total = op.Cast(op.Squeeze(op.Shape(attention_mask, start=1, end=2), [0]), to=int32)              # scalar
    rope = (cos_cache, sin_cache, position_ids) if rotary else (None, None, None)
    return msft.GroupQueryAttention(qkv, None, None, past_key, past_value, seqlens_k, total, *rope,
                                    num_heads=num_heads, kv_num_heads=kv_heads, scale=scale,
                                    do_rotary=int(rotary), rotary_interleaved=0)
