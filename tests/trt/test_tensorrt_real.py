"""Real TensorRT: build engines and run them. Needs tensorrt, cuda-python and a GPU (a Jetson, or a workstation
with TensorRT); skips with the reason otherwise. No development machine of this project has TensorRT, so these
have never run here - they are what to run first on a device (README / docs/jetson.md)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

trt = pytest.importorskip("tensorrt", reason="TensorRT's Python bindings are not installed (JetPack provides them)")
if getattr(trt, "__version__", None) is None:  # a directory named tensorrt on sys.path, not the bindings
    pytest.skip("TensorRT's Python bindings are not installed (JetPack provides them)", allow_module_level=True)

from export.tensorrt_build import export_tensorrt, plugin_candidates  # noqa: E402
from rt_helpers import PATCHES, build_tiny_export, expected_logits, expected_visual  # noqa: E402
from runtime.tensorrt.cuda import detect_gpu  # noqa: E402
from runtime.tensorrt.engine import TrtEngine  # noqa: E402

if detect_gpu() is None:
    pytest.skip("no CUDA GPU visible through cuda-python", allow_module_level=True)


@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-3), (np.float16, 5e-2)])
def test_tiny_contract_export_builds_and_runs(tmp_path, dtype, tol):
    weights = build_tiny_export(tmp_path / "onnx", dtype, max_positions=64)
    out = export_tensorrt(from_onnx=tmp_path / "onnx", out=tmp_path / "trt", max_seq=32, workspace_mb=256,
                          timing_cache=tmp_path / "timing.cache")
    if dtype == np.float16:
        weights = {**weights, "table": weights["table"].astype(np.float16).astype(np.float32)}
    for cuda_graph in (False, True):
        with TrtEngine(out, cuda_graph=cuda_graph) as engine:
            pixels = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
            visual = engine.encode_images(pixels)
            assert visual.shape == (1, PATCHES, engine.hidden_size)
            np.testing.assert_allclose(visual, expected_visual(pixels, weights), rtol=tol, atol=tol)
            for _ in range(2):  # the second round replays captured graphs
                prompt, seen = [5, 17, 99], weights["table"][[5, 17, 99]]
                np.testing.assert_allclose(engine.prefill(engine.embed_tokens(np.array(prompt))),
                                           expected_logits(seen, weights), rtol=tol, atol=tol)
                for token in (3, 250, 7):
                    seen = np.concatenate([seen, weights["table"][[token]]])
                    np.testing.assert_allclose(engine.decode(token), expected_logits(seen, weights),
                                               rtol=tol, atol=tol)


def test_plugin_lowering_matches_pytorch_greedy(tmp_path):
    """A tiny MoE checkpoint exported with --moe-impl plugin, built with the plugin library, decodes the same
    greedy tokens as the PyTorch model."""
    plugin = next((p for p in plugin_candidates() if p.is_file()), None)
    if plugin is None:
        pytest.skip("libmoe_llava_plugin.so not built (runtime/plugins/build.sh)")
    from moe_llava.inference import torch_pipeline
    from runtime.pipeline import load_pipeline
    from tiny import write_tiny_checkpoint

    checkpoint = tmp_path / "ckpt"
    write_tiny_checkpoint(checkpoint)
    out = export_tensorrt(model=checkpoint, out=tmp_path / "trt", moe_impl="plugin", precision="fp32",
                          plugin=plugin, max_seq=256)
    image = Path(__file__).resolve().parents[1] / "assets" / "shapes_96x60.png"  # the vision + projector engines
    assert image.is_file(), f"test asset {image} is missing"
    image = str(image)
    with torch_pipeline(str(checkpoint)) as reference, load_pipeline(out, backend="tensorrt") as engine:
        want = reference.generate(image, "What is in the image?", max_new_tokens=8)
        got = engine.generate(image, "What is in the image?", max_new_tokens=8)
    assert len(want.token_ids) >= 2 and got.token_ids == want.token_ids  # at least one decode step compared
