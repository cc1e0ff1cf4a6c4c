"""Fused-attention exports (GroupQueryAttention, rotary inside, shared KV buffer) against PyTorch, end to end.

The tiny default heads (D 16) keep the rotary outside the op (R/2 not a multiple of 8); these geometries put it
inside as for the released models: StableLM D 64 / R 16 (25 %), Phi D 80 / R 32 (40 %), Qwen-1 D 16 / R 16.
Existing parity tests (tests/export, tests/qwen, tests/model/test_siglip_export.py) run the default `ort`
export, i.e. the fused graph, through moe-run as well.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from export.onnx_export import export_onnx
from export.validate import TOLERANCES
from moe_llava.loading import load_pretrained
from moe_llava.torch_engine import TorchEngine
from runtime.ort_engine import OrtDeviceDecoder, HostDecoder, OrtEngine
from tiny import write_tiny_checkpoint

CASES = {
    "stablelm-fp32-clip": ("stablelm", "fp32", "clip", dict(hidden_size=128, num_attention_heads=2,
                                                             num_key_value_heads=2)),
    "phi-fp16-siglip": ("phi", "fp16", "siglip", dict(hidden_size=160, num_attention_heads=2,
                                                      partial_rotary_factor=0.4)),
    "qwen-fp16-siglip": ("qwen", "fp16", "siglip", {}),
}


def _attention_nodes(path) -> list[onnx.NodeProto]:
    return [n for n in onnx.load(str(path)).graph.node if n.op_type == "GroupQueryAttention"]


def _engine_matches_torch(out, checkpoint, precision: str, shared: bool) -> None:
    """Host (numpy buffers) and device (OrtValues, on CPU here) decoders step for step vs PyTorch: prefill 6,
    decode 3, then a new prefill on the same buffers."""
    torch_engine = TorchEngine(load_pretrained(checkpoint).model)
    tol = TOLERANCES[precision]
    rng = np.random.default_rng(0)
    with OrtEngine(out) as engine:
        assert isinstance(engine._decoder, HostDecoder) and engine._decoder.shared_cache == shared
        for decoder in (engine._decoder, OrtDeviceDecoder(ort, engine.sessions["decoder"], engine.manifest, 64, "cpu")):
            engine._decoder = decoder
            for prompt in (6, 4):
                embeds = torch_engine.embed_tokens(rng.integers(1, 200, prompt))
                pairs = [(engine.prefill(embeds), torch_engine.prefill(embeds))]
                pairs += [(engine.decode(t), torch_engine.decode(t)) for t in (7, 11, 3)]
                assert engine.cache_length == prompt + 3
                for got, want in pairs:
                    assert np.abs(got - want).max() <= tol.atol + tol.rtol * np.abs(want).max()


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_fused_export_matches_pytorch(case, tmp_path):
    family, precision, tower, geometry = CASES[case]
    checkpoint, out = tmp_path / "ckpt", tmp_path / "export"
    write_tiny_checkpoint(checkpoint, family, tower=tower, **geometry)
    export_onnx(checkpoint, out, "ort", precision)
    report = json.loads((out / "validation.json").read_text())
    assert report["passed"] and report["router_agreement"] == 1.0 and report["greedy_agreement"] == 1.0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["attention"] == "fused"
    nodes = _attention_nodes(out / "decoder.onnx")
    assert len(nodes) == 4
    assert all(onnx.helper.get_attribute_value(a) == 1 for n in nodes for a in n.attribute if a.name == "do_rotary")
    past_inputs = {n.input[3] for n in nodes}
    assert past_inputs == {f"past_key_values.{i}.key" for i in range(4)}  # the cache goes straight in
    _engine_matches_torch(out, checkpoint, precision, shared=True)


@pytest.mark.slow
def test_unfused_attention_stays_available(tmp_path):
    checkpoint, out = tmp_path / "ckpt", tmp_path / "export"
    write_tiny_checkpoint(checkpoint, "stablelm")
    export_onnx(checkpoint, out, "ort", "fp32", validate=False, attention="unfused")
    assert json.loads((out / "manifest.json").read_text())["attention"] == "unfused"
    assert not _attention_nodes(out / "decoder.onnx")
    _engine_matches_torch(out, checkpoint, "fp32", shared=False)
