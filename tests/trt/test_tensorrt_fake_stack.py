"""The builder and TrtEngine driven through the recording stand-ins of fake_trt.py (no TensorRT, no GPU).

What this checks is OUR code: the build sequence and the output directory, the manifest's engines section, the
plugin hand-off, and - executing each "engine" with onnxruntime on host memory posing as device memory, every
access bounds-checked - that TrtEngine binds shapes inside the profiles, chains the parts on the device, keeps
the KV cache ping-pong right and replays CUDA graphs correctly. It says nothing about TensorRT itself.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from export.tensorrt_build import export_tensorrt, network_flags  # noqa: E402
from rt_helpers import EOS, HIDDEN, PATCHES, build_tiny_export, expected_logits, expected_visual  # noqa: E402
from runtime.errors import UserError  # noqa: E402
from runtime.manifest import Manifest  # noqa: E402
from runtime.pipeline import load_pipeline  # noqa: E402
from runtime.tensorrt.engine import TrtEngine  # noqa: E402
from runtime.tensorrt.engine_set import EngineSet  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
# A StableLM-layout config.json with the tiny export's decoder geometry (2 layers, 2 kv heads of 4, hidden 8):
# what the memory plan reads from an ONNX export's manifest.
TINY_CONFIG = {
    "model_type": "moe_llava_stablelm", "hidden_size": HIDDEN, "num_attention_heads": 2, "num_key_value_heads": 2,
    "num_hidden_layers": 2, "intermediate_size": 16, "vocab_size": 257, "max_position_embeddings": 64,
    "mm_hidden_size": 48, "mm_image_tower": "openai/clip-vit-large-patch14-336", "image_projector_type": "linear",
    "moe": {"moe_enable": True, "num_experts": [4], "top_k_experts": 2, "moe_mode": "sparse"},
}


def tiny_onnx(tmp_path, dtype=np.float32, moe_impl=None, max_positions=64):
    src = tmp_path / f"onnx-{np.dtype(dtype).name}"
    weights = build_tiny_export(src, dtype, max_positions=max_positions)
    raw = json.loads((src / "manifest.json").read_text())
    raw["config"] = TINY_CONFIG
    raw["moe_impl"] = moe_impl or raw["moe_impl"]
    (src / "manifest.json").write_text(json.dumps(raw))
    return src, weights


def run_sequence(engine, weights, prompt, steps, tol):
    seen = weights["table"][prompt]
    np.testing.assert_allclose(engine.prefill(engine.embed_tokens(np.array(prompt))),
                               expected_logits(seen, weights), rtol=tol, atol=tol)
    for i, token in enumerate(steps, start=1):
        logits = engine.decode(token)
        seen = np.concatenate([seen, weights["table"][[token]]])
        assert engine.cache_length == len(prompt) + i
        np.testing.assert_allclose(logits, expected_logits(seen, weights), rtol=tol, atol=tol)


def test_build_writes_engines_manifest_plugin_and_trtexec_lines(tmp_path, fake_stack, capsys):
    trt, _ = fake_stack
    src, _ = tiny_onnx(tmp_path, moe_impl="plugin")
    plugin = tmp_path / "libmoe_llava_plugin.so"
    plugin.write_bytes(b"\x7fELF fake plugin")
    out = export_tensorrt(from_onnx=src, out=tmp_path / "trt", plugin=plugin, max_seq=48, workspace_mb=512,
                          timing_cache=tmp_path / "cache" / "timing.cache")
    names = sorted(p.name for p in out.iterdir())
    for part in ("vision", "projector", "embed", "decoder"):
        assert f"{part}.engine" in names and f"{part}.onnx" in names
    assert {"libmoe_llava_plugin.so", "manifest.json", "tokenizer.json", "validation.json"} <= set(names)
    assert (out / "decoder.onnx").stat().st_ino == (src / "decoder.onnx").stat().st_ino  # hard link, no copy
    assert json.loads((src / "manifest.json").read_text()).get("engines") is None  # the source is untouched
    assert trt.log.plugins == [str(plugin.resolve())]
    assert [b["workspace"] for b in trt.log.builds] == [512 << 20] * 4
    assert all(b["flags"] == 1 << 1 for b in trt.log.builds)  # strongly typed on 10.x
    assert (tmp_path / "cache" / "timing.cache").read_bytes() == b"fake timing cache"
    raw = json.loads((out / "manifest.json").read_text())
    section = raw["engines"]
    assert raw["versions"]["tensorrt"] == section["tensorrt_version"] == "10.3.0.30"
    assert section["plugin"] == "libmoe_llava_plugin.so" and section["max_seq"] == 48
    assert section["gpu"] == {"family": "orin", "name": "Fake Orin", "compute_capability": "8.7"}
    assert [p["name"] for p in section["parts"]["decoder"]["profiles"]] == ["prefill", "decode"]
    engines = EngineSet.load(Manifest.load(out))
    assert engines.plugin_path() == out / "libmoe_llava_plugin.so"
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("equivalent trtexec commands")
    decoder_line = next(line for line in printed if "decoder.engine" in line)
    assert f"--dynamicPlugins={out / 'libmoe_llava_plugin.so'}" in decoder_line and "--profile=1" in decoder_line
    assert list(tmp_path.glob(".trt*")) == []  # no staging left behind
    with TrtEngine(out):  # loads the engine dir's copy: the same bytes, so not registered a second time
        pass
    assert trt.log.plugins == [str(plugin.resolve())]


def test_portable_graphs_need_no_plugin_and_tensorrt_11_needs_no_flag(tmp_path, fake_stack):
    trt, _ = fake_stack
    trt.__version__ = "11.1.0.106"
    src, _ = tiny_onnx(tmp_path)
    out = export_tensorrt(from_onnx=src, out=tmp_path / "trt", max_seq=32)
    assert trt.log.plugins == [] and all(b["flags"] == 0 for b in trt.log.builds)
    assert network_flags(trt) == 0
    assert json.loads((out / "manifest.json").read_text())["engines"]["plugin"] is None


def test_refusals_before_any_work(tmp_path, fake_stack):
    trt, cudart = fake_stack
    src, _ = tiny_onnx(tmp_path, moe_impl="plugin")
    with pytest.raises(UserError, match="libmoe_llava_plugin.so was not found.*build.sh"):
        export_tensorrt(from_onnx=src, out=tmp_path / "a", plugin=None)
    with pytest.raises(UserError, match="--moe-impl portable but .* was exported with --moe-impl plugin"):
        export_tensorrt(from_onnx=src, out=tmp_path / "b", moe_impl="portable")
    with pytest.raises(UserError, match="either --model .* or --from-onnx"):
        export_tensorrt(model="demo", from_onnx=src, out=tmp_path / "c")
    with pytest.raises(UserError, match="--gpu hopper .* SM 8.7"):
        export_tensorrt(from_onnx=src, out=tmp_path / "d", gpu="hopper")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="exists and is not an export directory"):
        export_tensorrt(from_onnx=src, out=tmp_path / "e")
    raw = json.loads((src / "manifest.json").read_text())
    (src / "manifest.json").write_text(json.dumps({**raw, "attention": "fused"}))
    with pytest.raises(UserError, match="GroupQueryAttention .* re-export it with --attention unfused"):
        export_tensorrt(from_onnx=src, out=tmp_path / "g")
    (src / "manifest.json").write_text(json.dumps(raw))
    trt.__version__ = "8.5.2.2"
    with pytest.raises(UserError, match="too old"):
        export_tensorrt(from_onnx=src, out=tmp_path / "f")
    assert trt.log.builds == [] and sorted(p.name for p in tmp_path.iterdir()) == ["e", src.name]


def test_fp8_export_is_refused_on_orin(tmp_path, fake_stack):
    src, _ = tiny_onnx(tmp_path)
    raw = json.loads((src / "manifest.json").read_text())
    raw["precision"] = "fp8"
    (src / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(UserError, match="fp8 needs FP8 tensor cores.*Orin"):
        export_tensorrt(from_onnx=src, out=tmp_path / "trt")


@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-5), (np.float16, 5e-2)])
def test_trt_engine_prefill_decode_and_images(tmp_path, fake_stack, dtype, tol):
    _, cudart = fake_stack
    src, weights = tiny_onnx(tmp_path, dtype)
    out = export_tensorrt(from_onnx=src, out=tmp_path / "trt", max_seq=16, max_batch=2)
    if dtype == np.float16:
        weights = {**weights, "table": weights["table"].astype(np.float16).astype(np.float32)}
    with TrtEngine(out) as engine:
        assert engine.hidden_size == HIDDEN and engine._decoder.max_len == 16
        pixels = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
        visual = engine.encode_images(pixels)
        assert visual.dtype == np.float32 and visual.shape == (2, PATCHES, HIDDEN)
        np.testing.assert_allclose(visual, expected_visual(pixels, weights), rtol=tol, atol=tol)
        run_sequence(engine, weights, [5, 17, 99], [3, 250, 7, 7], tol)
        run_sequence(engine, weights, [4], [9, 1], tol)  # a new request resets the cache
        run_sequence(engine, weights, list(range(15)), [2], tol)  # fills all 16 positions
        with pytest.raises(UserError, match="context full"):
            engine.decode(3)
        with pytest.raises(UserError, match="3 images; the vision engine takes 1..2"):
            engine.encode_images(np.zeros((3, 3, 8, 8), np.float32))
    assert cudart.device == {} and cudart.host == {} and cudart.streams == 0  # everything freed


def test_cuda_graphs_replay_repeated_lengths(tmp_path, fake_stack):
    _, cudart = fake_stack
    src, weights = tiny_onnx(tmp_path)
    out = export_tensorrt(from_onnx=src, out=tmp_path / "trt", max_seq=16)
    with TrtEngine(out, cuda_graph=True) as engine:
        # keys are (cached length, KV half); prefill writes half 1
        run_sequence(engine, weights, [5, 17], [3, 4, 5], 1e-5)  # captures (2,1), (3,0), (4,1)
        assert cudart.launches == 0 and len(engine._decoder.graphs.graphs) == 3
        run_sequence(engine, weights, [8, 9], [10, 11, 12], 1e-5)  # same lengths: replays with new tokens
        assert cudart.launches == 3
        run_sequence(engine, weights, [8, 1, 2, 3], [10, 11], 1e-5)  # (4,1) recurs, (5,0) is new
        assert cudart.launches == 4 and len(engine._decoder.graphs.graphs) == 4


def test_max_len_caps_the_cache_and_shapes_outside_the_profile_are_user_errors(tmp_path, fake_stack):
    src, weights = tiny_onnx(tmp_path)
    out = export_tensorrt(from_onnx=src, out=tmp_path / "trt", max_seq=16)
    with TrtEngine(out, max_len=4) as engine:
        assert engine._decoder.layout.max_len == 4
        with pytest.raises(UserError, match="context full"):
            engine.prefill(np.zeros((5, HIDDEN), np.float32))
    with TrtEngine(out, max_len=1000) as engine:
        assert engine._decoder.max_len == 16  # never more than the engines take
        with pytest.raises(UserError, match="outside the engine's profile"):
            engine._runners["decode"].set_shapes({"inputs_embeds": (1, 2, HIDDEN)})


def test_runtime_refuses_onnx_only_dirs_and_foreign_engines(tmp_path, fake_stack):
    trt, cudart = fake_stack
    src, _ = tiny_onnx(tmp_path)
    with pytest.raises(UserError, match="no TensorRT engines in this export directory.*--from-onnx"):
        TrtEngine(src)
    out = export_tensorrt(from_onnx=src, out=tmp_path / "trt", max_seq=16)
    cudart.sm, cudart.name = (9, 0), b"H100"
    with pytest.raises(UserError, match="built for SM 8.7 .*this GPU H100 is SM 9.0"):
        TrtEngine(out)
    cudart.sm = (8, 7)
    trt.__version__ = "10.16.0.1"
    with pytest.raises(UserError, match="built with TensorRT 10.3.0.30, this is 10.16.0.1"):
        TrtEngine(out)
    assert cudart.device == {} and cudart.host == {}  # a failed open frees what it took


def test_out_of_gpu_memory_is_a_user_error(tmp_path, fake_stack):
    _, cudart = fake_stack
    src, _ = tiny_onnx(tmp_path)
    out = export_tensorrt(from_onnx=src, out=tmp_path / "trt", max_seq=16)
    cudart.memory_limit = 2000
    with pytest.raises(UserError, match="out of GPU memory"):
        TrtEngine(out)
    assert cudart.device == {}


def test_load_pipeline_tensorrt_matches_onnxruntime(tmp_path, fake_stack):
    src, _ = tiny_onnx(tmp_path, max_positions=512)
    out = export_tensorrt(from_onnx=src, out=tmp_path / "trt", max_seq=256)  # the template's prompt is ~190
    image = tmp_path / "img.png"
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(image)
    with load_pipeline(out, backend="onnxruntime") as ort_pipe:
        want = ort_pipe.generate(str(image), "Describe.", max_new_tokens=6)
    with load_pipeline(out, backend="tensorrt") as trt_pipe:
        assert isinstance(trt_pipe.engine, TrtEngine)
        got = trt_pipe.generate(str(image), "Describe.", max_new_tokens=6)
    assert got.token_ids == want.token_ids and got.text == want.text and EOS not in got.token_ids


def test_missing_runtime_packages_are_named(tmp_path, fake_stack, monkeypatch):
    src, _ = tiny_onnx(tmp_path)
    out = export_tensorrt(from_onnx=src, out=tmp_path / "trt", max_seq=16)
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    monkeypatch.setitem(sys.modules, "cuda", None)
    with pytest.raises(UserError, match="cuda-python is not installed: pip install"):
        TrtEngine(out)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(UserError, match="tensorrt .* not installed.*JetPack.*--backend onnxruntime"):
        load_pipeline(out, backend="tensorrt")


def test_from_onnx_build_imports_no_torch(tmp_path):
    """A whole --from-onnx build (through the stand-ins) in a fresh interpreter loads no torch, transformers,
    moe_llava or torch-side export module: on the device it needs only the runtime install."""
    src, _ = tiny_onnx(tmp_path)
    code = (
        "import json, sys, types\n"
        f"sys.path.insert(0, {str(HERE)!r})\n"
        "import fake_trt\n"
        "cudart = fake_trt.FakeCudart()\n"
        "cuda, bindings = types.ModuleType('cuda'), types.ModuleType('cuda.bindings')\n"
        "bindings.runtime, cuda.bindings = cudart, bindings\n"
        "sys.modules.update({'tensorrt': fake_trt.make_tensorrt(cudart), 'cuda': cuda, 'cuda.bindings': bindings})\n"
        "import cli\n"
        f"rc = cli.export_main(['--from-onnx', {str(src)!r}, '--target', 'tensorrt', '--max-seq', '16', "
        f"'--out', {str(tmp_path / 'trt')!r}])\n"
        "print(json.dumps([rc, sorted(m for m in ('torch', 'transformers', 'moe_llava', 'export.onnx_export', "
        "'export.moe_lowering', 'export.validate') if m in sys.modules)]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [0, []]
    assert (tmp_path / "trt" / "decoder.engine").is_file()
