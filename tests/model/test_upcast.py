"""keep_stored=True: 16-bit weights computed in fp32 give the fp32 load's numbers bit for bit, in half the memory."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from moe_llava import upcast
from moe_llava.loading import load_pretrained
from moe_llava.torch_engine import TorchEngine
from tiny import write_tiny_checkpoint


@pytest.mark.parametrize("row_blocks", [False, True])
def test_fp16_checkpoint_computed_in_fp32_equals_the_fp32_load(tmp_path, monkeypatch, row_blocks):
    """row_blocks: the LM head casts its weight 128 rows at a time and the embedding table only the rows it
    gathers, as the released model's do (8192-row blocks); the numbers must not move by a bit. (Blocks of 8
    rows did move them by 1 ULP: MKL picks other kernels for such thin products.)"""
    if row_blocks:
        monkeypatch.setattr(upcast, "LARGE_BYTES", 32 << 10)
    write_tiny_checkpoint(tmp_path, "stablelm", seed=3)
    # re-save in fp16: the released checkpoints' storage
    from moe_llava.loading import save_pretrained
    fp16 = load_pretrained(tmp_path, dtype="fp16").model
    half_dir = tmp_path / "half"
    save_pretrained(fp16, half_dir, tmp_path / "_tok")
    plain = load_pretrained(half_dir, dtype="fp32")
    stored = load_pretrained(half_dir, dtype="fp32", keep_stored=True)
    replaced = {type(m).__mro__[1] for m in stored.model.modules() if "forward" in vars(m)}
    assert replaced == ({nn.Linear, nn.Embedding} if row_blocks else set())
    kinds = {p.dtype for p in stored.model.parameters()}
    assert torch.float16 in kinds                         # weights held as stored ...
    assert {b.dtype for b in stored.model.buffers() if b.is_floating_point()} <= {torch.float32}
    results = []
    for loaded in (plain, stored):
        engine = TorchEngine(loaded.model)
        assert engine.dtype == torch.float32 and engine.vision_dtype == torch.float32   # ... computed in fp32
        pixels = np.random.default_rng(0).normal(size=(1, 3, 28, 28)).astype(np.float32)
        image = engine.encode_images(pixels)[0]
        embeds = np.concatenate([engine.embed_tokens(np.array([5, 9, 11])), image, engine.embed_tokens(np.array([7]))])
        first = engine.prefill(embeds)
        step = engine.extend(engine.embed_tokens(np.array([int(np.argmax(first[-1]))])))
        results.append((image, first, step))
    for want, got in zip(*results):
        np.testing.assert_array_equal(got, want)
