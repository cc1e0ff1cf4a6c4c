"""The fused attention lowering against transformers: the swapped module, the op, the GroupQueryAttention node.

Chain of evidence: ExportAttention (eager `moe_llava::gqa`) == transformers' attention module; the ONNX
GroupQueryAttention node == eager `moe_llava::gqa` (partial rotary, shared buffer and concat mode, chunks after a
cache). Whole exported decoders against PyTorch: test_fused_export.py.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from export.attention_lowering import (AttentionImpl, ExportAttention, KVSlots, gqa_op, rotary_caches,
                                       swap_in_export_attention, translation_table)
from moe_llava.backbones import BACKBONES
from runtime.errors import UserError
from tiny import tiny_config

# head 64 / 80 / 16 make R/2 a multiple of 8 (rotary inside the op); head 16 StableLM / Phi does not (outside)
GEOMETRIES = {
    "stablelm-fused": ("stablelm", dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=2)),
    "phi-fused": ("phi", dict(hidden_size=160, num_attention_heads=2, partial_rotary_factor=0.4)),
    "qwen-fused": ("qwen", {}),
    "stablelm-outside": ("stablelm", {}),
    "phi-outside": ("phi", {}),
}


def _lm(name: str) -> nn.Module:
    family, overrides = GEOMETRIES[name]
    config = tiny_config(family, moe=False, **overrides)
    torch.manual_seed(0)
    lm = BACKBONES[family].build(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in lm.parameters():
            p.normal_(std=0.3)
    return lm


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_export_attention_equals_transformers(name):
    """Prefill 5 positions, then 2 more on that cache: the swapped module's outputs and cache equal transformers'."""
    from transformers import DynamicCache
    lm = _lm(name)
    attn = lm.model.layers[0].self_attn
    kv_heads, d = lm.config.num_key_value_heads, attn.head_dim
    swapped = ExportAttention(attn, 0, KVSlots(1), rotary_caches(lm))
    assert swapped.fused_rotary == name.endswith("fused")
    x = torch.randn(1, 7, lm.config.hidden_size)
    cache, past = DynamicCache(config=lm.config), [torch.zeros(1, kv_heads, 0, d)] * 2
    for lo, hi in ((0, 5), (5, 7)):
        positions = torch.arange(lo, hi)[None]
        rope = lm.model.rotary_emb(x, position_ids=positions)
        mask = torch.full((hi - lo, hi), float("-inf")).triu(lo + 1)[None, None]  # causal [1,1,S,T]
        with torch.no_grad():
            want, _ = attn(x[:, lo:hi], attention_mask=mask, cache=cache, position_embeddings=rope)
            swapped.slots.load(past, torch.ones(1, hi, dtype=torch.long), positions)
            got, _ = swapped(x[:, lo:hi], position_embeddings=rope)
        past = swapped.slots.presents
        # fp32 products blocked differently (one fused QKV GEMM vs three, and the BLAS's split of each reduction over
        # threads) differ by a few ulp of the output's scale (|want| ~ 30 with these std-0.3 weights)
        torch.testing.assert_close(got, want, atol=1e-5 * float(want.abs().max()) + 1e-6, rtol=1e-5)
        torch.testing.assert_close(past[0], cache.layers[0].keys, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(past[1], cache.layers[0].values, atol=2e-5, rtol=1e-5)


class _OpOnly(nn.Module):
    def __init__(self, cos, sin, heads, kv_heads):
        super().__init__()
        self.register_buffer("cos", cos)
        self.register_buffer("sin", sin)
        self.heads, self.kv_heads = heads, kv_heads

    def forward(self, qkv, past_key, past_value, attention_mask, position_ids):
        return gqa_op(qkv, past_key, past_value, attention_mask, position_ids, self.cos, self.sin, self.heads,
                      self.kv_heads, 0.125, True)


@pytest.fixture(scope="module")
def gqa_session(tmp_path_factory):
    """The `ort` translation alone: 4 query heads, 2 kv heads, D 64, R 16 (StableLM's 25 %), 32 positions."""
    torch.manual_seed(1)
    cos_sin = torch.randn(2, 32, 8)
    module = _OpOnly(cos_sin[0], cos_sin[1], 4, 2)
    dims = {k: torch.export.Dim(k) for k in ("s", "t", "p")}
    args = (torch.randn(1, 3, 512), torch.randn(1, 2, 4, 64), torch.randn(1, 2, 4, 64),
            torch.ones(1, 5, dtype=torch.long), torch.arange(2, 5)[None])
    shapes = ({1: dims["s"]}, {2: dims["p"]}, {2: dims["p"]}, {1: dims["t"]}, {1: dims["s"]})
    path = tmp_path_factory.mktemp("gqa") / "gqa.onnx"
    program = torch.onnx.export(module.eval(), args, dynamo=True, dynamic_shapes=shapes, opset_version=18,
                                custom_translation_table=translation_table(), input_names=[
                                    "qkv", "past_key", "past_value", "attention_mask", "position_ids"])
    program.save(str(path))
    return module, ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_group_query_attention_node_equals_the_op(gqa_session):
    """Prompt 5, chunk 3, token 1: shared [1,KVH,32,D] buffer bound as past and present, and concat mode."""
    module, session = gqa_session
    qkv = torch.randn(1, 9, 512)
    shared_k, shared_v = np.zeros((1, 2, 32, 64), np.float32), np.zeros((1, 2, 32, 64), np.float32)
    past = [torch.zeros(1, 2, 0, 64)] * 2
    for lo, hi in ((0, 5), (5, 8), (8, 9)):
        feeds = {"qkv": qkv[:, lo:hi].numpy(), "attention_mask": np.ones((1, hi), np.int64),
                 "position_ids": np.arange(lo, hi)[None]}
        want, *past = module(qkv[:, lo:hi], *past, torch.ones(1, hi, dtype=torch.long), torch.arange(lo, hi)[None])
        concat = session.run(None, {**feeds, "past_key": past[0][:, :, :lo].numpy(),
                                    "past_value": past[1][:, :, :lo].numpy()})
        binding = session.io_binding()
        for name, array in {**feeds, "past_key": shared_k, "past_value": shared_v}.items():
            binding.bind_cpu_input(name, array)
        binding.bind_output(session.get_outputs()[0].name, "cpu")
        for output, buffer in zip(session.get_outputs()[1:], (shared_k, shared_v)):
            binding.bind_output(output.name, "cpu", 0, np.float32, list(buffer.shape), buffer.ctypes.data)
        session.run_with_iobinding(binding)
        for got in (concat[0], binding.get_outputs()[0].numpy()):
            np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=1e-5)
        for got_k, got_v in ((concat[1], concat[2]), (shared_k[:, :, :hi], shared_v[:, :, :hi])):
            np.testing.assert_allclose(got_k, past[0].numpy(), atol=1e-5, rtol=1e-5)
            np.testing.assert_allclose(got_v, past[1].numpy(), atol=1e-6)


def test_swap_covers_every_layer_and_refuses_qk_layernorm():
    lm = _lm("stablelm-fused")
    slots = swap_in_export_attention(lm)
    assert slots.num_layers == 4 and all(isinstance(layer.self_attn, ExportAttention) for layer in lm.model.layers)
    config = tiny_config("phi", moe=False, qk_layernorm=True)
    lm = BACKBONES["phi"].build(config)
    with pytest.raises(UserError, match="--attention unfused"):
        swap_in_export_attention(lm)


@pytest.mark.parametrize("asked,moe_impl,want", [("auto", "ort", "fused"), ("auto", "portable", "unfused"),
                                                 ("auto", "plugin", "unfused"), ("unfused", "ort", "unfused")])
def test_attention_choice(asked, moe_impl, want):
    assert AttentionImpl(asked).resolve(moe_impl).value == want


def test_fused_attention_needs_the_ort_lowering():
    with pytest.raises(UserError, match="needs --moe-impl ort"):
        AttentionImpl.FUSED.resolve("portable")
