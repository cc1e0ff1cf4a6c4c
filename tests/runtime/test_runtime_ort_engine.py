"""OrtEngine session plumbing on the tiny contract-conforming export (see rt_helpers' docstring)."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

import onnxruntime as ort

from rt_helpers import EOS, HIDDEN, PATCHES, build_tiny_export, expected_logits, expected_visual  # noqa: E402
from runtime.cli_output import run_to_stdout  # noqa: E402
from runtime.errors import UserError  # noqa: E402
from runtime.manifest import Manifest  # noqa: E402
from runtime.ort_engine import OrtDeviceDecoder, OrtEngine  # noqa: E402
from runtime.pipeline import load_pipeline  # noqa: E402
from runtime.settings import GenerationSettings  # noqa: E402


@pytest.fixture(scope="module")
def fp32_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("fp32")
    return out, build_tiny_export(out, np.float32)


@pytest.fixture(scope="module")
def fp16_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("fp16")
    return out, build_tiny_export(out, np.float16)


def run_sequence(engine, weights, prompt_ids, next_ids, rtol):
    """Prefill prompt_ids, decode next_ids; check every logits vector and the cache length."""
    embeds = engine.embed_tokens(np.array(prompt_ids, np.int64))
    assert embeds.dtype == np.float32 and embeds.shape == (len(prompt_ids), HIDDEN)
    seen = weights["table"][prompt_ids]
    logits = engine.prefill(embeds)
    assert logits.dtype == np.float32 and logits.shape == (257,)
    np.testing.assert_allclose(logits, expected_logits(seen, weights), rtol=rtol, atol=rtol)
    for step, token in enumerate(next_ids, start=1):
        logits = engine.decode(token)
        seen = np.concatenate([seen, weights["table"][[token]]])
        assert engine.cache_length == len(prompt_ids) + step
        np.testing.assert_allclose(logits, expected_logits(seen, weights), rtol=rtol, atol=rtol)


def test_fp32_prefill_decode_and_kv_growth(fp32_export):
    out, weights = fp32_export
    with OrtEngine(out) as engine:
        assert engine.hidden_size == HIDDEN and engine.providers == ["CPUExecutionProvider"]
        run_sequence(engine, weights, [5, 17, 99], [3, 250, 7, 7], rtol=1e-5)
        run_sequence(engine, weights, [1], [2, 3], rtol=1e-5)  # prefill starts a new cache


def test_encode_images(fp32_export):
    out, weights = fp32_export
    pixels = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    with OrtEngine(out) as engine:
        visual = engine.encode_images(pixels)
    assert visual.dtype == np.float32 and visual.shape == (2, PATCHES, HIDDEN)
    np.testing.assert_allclose(visual, expected_visual(pixels, weights), rtol=1e-5, atol=1e-5)


def test_fp16_export_casts_inputs_and_returns_float32(fp16_export):
    out, weights = fp16_export
    with OrtEngine(out) as engine:
        assert engine._decoder.cache.dtype == np.float16
        pixels = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)  # cast to fp16 inside
        visual = engine.encode_images(pixels)
        assert visual.dtype == np.float32
        np.testing.assert_allclose(visual, expected_visual(pixels, weights), rtol=2e-2, atol=2e-2)
        run_sequence(engine, {**weights, "table": weights["table"].astype(np.float16).astype(np.float32)},
                     [5, 17, 99], [3, 250], rtol=5e-2)


def test_device_resident_kv_path_matches(fp32_export):
    """The CUDA path's IOBinding/OrtValue plumbing, run with CPU OrtValues (no GPU here)."""
    out, weights = fp32_export
    with OrtEngine(out) as engine:
        engine._decoder = OrtDeviceDecoder(ort, engine.sessions["decoder"], engine.manifest, 64, device="cpu")
        run_sequence(engine, weights, [5, 17, 99], [3, 250, 7], rtol=1e-5)
        run_sequence(engine, weights, [4], [9], rtol=1e-5)


@pytest.mark.parametrize("device_path", [False, True])
def test_context_full_is_a_user_error(fp32_export, device_path):
    out, _ = fp32_export
    with OrtEngine(out, max_len=4) as engine:
        if device_path:
            engine._decoder = OrtDeviceDecoder(ort, engine.sessions["decoder"], engine.manifest, 4, device="cpu")
        engine.prefill(engine.embed_tokens(np.arange(3, dtype=np.int64)))
        engine.decode(1)
        with pytest.raises(UserError, match="context full"):
            engine.decode(2)


def test_missing_onnxruntime_says_how_to_install(fp32_export, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` raise ImportError
    with pytest.raises(UserError, match="pip install onnxruntime"):
        OrtEngine(fp32_export[0])


def test_unavailable_cuda_falls_back_to_cpu_with_a_warning(fp32_export):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.warns(RuntimeWarning, match="onnxruntime-gpu"):
        engine = OrtEngine(fp32_export[0], providers=["cuda"])
    assert engine.providers == ["CPUExecutionProvider"]


def test_model_file_that_disagrees_with_the_manifest(fp32_export, tmp_path):
    out, _ = fp32_export
    for f in out.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "embed.onnx").write_bytes((out / "vision.onnx").read_bytes())
    with pytest.raises(UserError, match="embed.onnx: inputs"):
        OrtEngine(tmp_path)


def test_load_pipeline_end_to_end(fp32_export, tmp_path):
    out, _ = fp32_export
    image = tmp_path / "img.png"
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(image)
    pipe = load_pipeline(out)
    result = pipe.generate(str(image), "Describe.", max_new_tokens=6)
    assert len(result.token_ids) <= 6 and EOS not in result.token_ids
    assert result.prompt_tokens == result.timings["prompt_tokens"] > PATCHES
    again = pipe.generate(str(image), "Describe.", max_new_tokens=6)
    assert again.token_ids == result.token_ids and again.text == result.text  # greedy is repeatable
    pipe.close()


def test_run_to_stdout_json_and_plain(fp32_export, tmp_path, capsys):
    out, _ = fp32_export
    from PIL import Image

    image = tmp_path / "img.png"
    Image.new("RGB", (12, 7), (200, 10, 30)).save(image)
    with load_pipeline(out) as pipe:
        assert run_to_stdout(pipe, str(image), "Hi", GenerationSettings(5), as_json=True) == 0
        captured = capsys.readouterr()
        last = captured.out.rstrip("\n").split("\n")[-1]
        payload = json.loads(last)
        assert set(payload) == {"text", "token_ids", "timings", "prompt_tokens", "finish_reason"}
        assert payload["token_ids"] == pipe.last_result.token_ids
        assert captured.out.startswith(payload["text"])  # streamed first, then the JSON line
        assert payload["prompt_tokens"] > PATCHES and payload["timings"]["vision_ms"] >= 0

        assert run_to_stdout(pipe, None, "Hi", GenerationSettings(5), as_json=False) == 0
        captured = capsys.readouterr()
        assert captured.out == pipe.last_result.text + "\n"
        assert "tok/s" in captured.err and "ttft" in captured.err


def test_unknown_backend(fp32_export):
    with pytest.raises(UserError, match="unknown backend"):
        load_pipeline(fp32_export[0], backend="tvm")


def test_fp32_fused_graph_on_cuda_warns(fp32_export):
    """GroupQueryAttention's CUDA kernels are fp16/bf16: an fp32 fused export on CUDA says so (no GPU needed)."""
    import dataclasses
    import warnings

    from runtime.ort_engine import _warn_fp32_fused_on_cuda
    manifest = dataclasses.replace(Manifest.load(fp32_export[0]), attention="fused")
    with pytest.warns(RuntimeWarning, match="--precision fp16 for CUDA"):
        _warn_fp32_fused_on_cuda(manifest)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_fp32_fused_on_cuda(dataclasses.replace(manifest, precision="fp16"))
        _warn_fp32_fused_on_cuda(dataclasses.replace(manifest, attention="unfused"))
