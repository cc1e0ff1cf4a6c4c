"""One copy of each thing on the device, as far as the stand-ins can show it: what the TensorRT backend
allocates (counted by the stand-in CUDA) equals the memory plan's figures; engines are deserialised through a
stream reader or a memory map, never a whole-file bytes copy; a failed CUDA-graph capture frees its graph;
TensorRT's own plugins are registered before any engine is deserialised."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import fake_trt
from export.boards import BOARDS, parse_board
from export.memory_plan import PlanRequest, WeightPrecision, plan_memory
from export.tensorrt_build import export_tensorrt
from moe_llava.config import MoELlavaConfig
from runtime.errors import UserError
from runtime.tensorrt import engine_reader, libraries
from runtime.tensorrt.cuda import Cuda
from runtime.tensorrt.engine import TrtEngine
from runtime.tensorrt.parts import numpy_dtype
from test_tensorrt_fake_stack import TINY_CONFIG, run_sequence, tiny_onnx

RELEASED = Path(__file__).resolve().parents[1] / "assets" / "released_configs"


def test_kv_cache_allocation_is_the_plans_figure(tmp_path, fake_stack):
    _, cudart = fake_stack
    src, _ = tiny_onnx(tmp_path)
    out = export_tensorrt(from_onnx=src, out=tmp_path / "trt", max_seq=16)
    plan = plan_memory(MoELlavaConfig.from_dict(TINY_CONFIG),
                       PlanRequest(WeightPrecision.FP32, BOARDS["orin-nano-8gb"], max_seq=16))
    with TrtEngine(out) as engine:
        assert cudart.device[engine._decoder.buffers.kv].nbytes == plan["kv_cache"]  # counted by the stand-in
        assert engine._decoder.layout.nbytes == plan["kv_cache"]


@pytest.fixture
def aligned_geometry(monkeypatch):
    """The tiny export with 4 kv heads of 16 (hidden 64): one fp32 position is 256 bytes, so the builder takes
    the one-buffer KV-append graph."""
    import rt_helpers
    for name, value in (("KVH", 4), ("HEAD_DIM", 16), ("HIDDEN", 64)):
        monkeypatch.setattr(rt_helpers, name, value)
    return {**TINY_CONFIG, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4}


def test_kv_cache_is_one_buffer_written_in_place(tmp_path, fake_stack, aligned_geometry, capsys):
    _, cudart = fake_stack
    src, weights = tiny_onnx(tmp_path)
    before = (src / "decoder.onnx").read_bytes()
    out = export_tensorrt(from_onnx=src, out=tmp_path / "trt", max_seq=16)
    assert json.loads((out / "manifest.json").read_text())["engines"]["kv_mode"] == "append"
    assert (src / "decoder.onnx").read_bytes() == before and not (src / "decoder.trt.onnx").exists()
    assert "--onnx=" + str(out / "decoder.trt.onnx") in capsys.readouterr().out
    plan = plan_memory(MoELlavaConfig.from_dict(aligned_geometry),
                       PlanRequest(WeightPrecision.FP32, BOARDS["orin-nano-8gb"], max_seq=16))
    assert plan["kv_mode"] == "append" and plan["kv_copies"] == 1
    with TrtEngine(out, cuda_graph=True) as engine:
        assert cudart.device[engine._decoder.buffers.kv].nbytes == plan["kv_cache"] == 2 * 2 * 16 * 64 * 4
        run_sequence(engine, weights, [5, 17, 99], [3, 250, 7], 1e-5)
        run_sequence(engine, weights, [5, 17, 98], [3, 250, 7], 1e-5)  # replays the captured decode steps
        assert cudart.launches == 3
        run_sequence(engine, weights, list(range(15)), [2], 1e-5)  # fills all 16 positions


def test_a_failed_capture_releases_its_graph(fake_stack):
    _, cudart = fake_stack
    cuda = Cuda(cudart)
    stream = cuda.stream()

    def failing():
        raise RuntimeError("enqueue failed during capture")

    with pytest.raises(RuntimeError, match="during capture"):
        cuda.capture(stream, failing)
    assert cudart.capturing is None and cudart.live_graphs == set()
    cuda.capture(stream, lambda: None)
    assert cudart.live_graphs == set()  # the instantiated exec stays; the graph itself is freed
    cuda.close()


def test_builtin_plugins_are_registered_before_deserialising(tmp_path, fake_stack, monkeypatch):
    """An engine holding one of TensorRT's own plugins deserialises in a fresh process only after
    init_libnvinfer_plugins (here: the registry emptied after the build, as a new process has it)."""
    trt, _ = fake_stack
    src, _ = tiny_onnx(tmp_path)
    out = export_tensorrt(from_onnx=src, out=tmp_path / "trt", max_seq=16)
    plan = json.loads((out / "decoder.engine").read_bytes())
    plan["plugins"] = [["EfficientNMS_TRT", "1", ""]]
    (out / "decoder.engine").write_text(json.dumps(plan))
    trt.registry.creators.clear()
    monkeypatch.setattr(libraries, "_BUILTIN_PLUGINS", set())
    before = trt.log.builtin_plugins
    with TrtEngine(out):
        assert trt.log.builtin_plugins == before + 1


@pytest.mark.parametrize("version, how", [("10.3.0.30", "mmap"), ("10.8.0.43", "mmap"), ("10.13.3.9", "stream"),
                                          ("11.1.0.106", "stream")])
def test_engines_are_read_without_a_whole_file_copy(tmp_path, fake_stack, monkeypatch, version, how):
    trt, _ = fake_stack
    src, _ = tiny_onnx(tmp_path)
    trt.__version__ = version
    out = export_tensorrt(from_onnx=src, out=tmp_path / "trt", max_seq=16)
    monkeypatch.setattr(engine_reader, "READ_CHUNK_BYTES", 1000)
    readers = []
    original = engine_reader._file_reader
    monkeypatch.setattr(engine_reader, "_file_reader", lambda t, f: readers.append(original(t, f)) or readers[-1])
    with TrtEngine(out):
        assert trt.log.deserialised == [how] * 4
    if how == "stream":
        assert len(readers) == 4 and all(0 < r.max_chunk <= 1000 for r in readers)
        assert (out / "decoder.engine").stat().st_size > 1000  # so it took several reads


def test_types_numpy_cannot_hold_are_named(tmp_path):
    trt = fake_trt.make_tensorrt(fake_trt.FakeCudart())
    assert numpy_dtype(trt, trt.DataType.HALF, tmp_path, "x") == np.float16
    assert numpy_dtype(trt, trt.DataType.INT8, tmp_path, "x") == np.int8
    for dtype in (trt.DataType.BF16, trt.DataType.FP8, trt.DataType.INT4):
        with pytest.raises(UserError, match="numpy cannot hold"):
            numpy_dtype(trt, dtype, tmp_path, "logits")


def released_manifest(src, name: str, precision: str):
    raw = json.loads((src / "manifest.json").read_text())
    raw["config"] = json.loads((RELEASED / name / "config.json").read_text())
    raw["precision"] = precision
    (src / "manifest.json").write_text(json.dumps(raw))


def test_a_build_that_cannot_fit_the_board_stops_before_it_starts(tmp_path, fake_stack):
    trt, _ = fake_stack
    src, _ = tiny_onnx(tmp_path, max_positions=4096)
    released_manifest(src, "MoE-LLaVA-StableLM-1.6B-4e", "fp16")
    with pytest.raises(UserError, match=r"fp16 at --max-seq 2048 needs 6\.\d\d GiB but orin-nano-8gb has 6\.50 GiB "
                                        r"usable .*over\); would fit: --precision int8 .* or --precision int4"):
        export_tensorrt(from_onnx=src, out=tmp_path / "a", gpu="orin-nano-8gb", max_seq=2048)
    with pytest.raises(UserError, match="MoE plugin needs 61 MiB of workspace for 2048 tokens .* --workspace-mb "
                                        "is 32; use --workspace-mb 61 or --max-seq 1024"):
        plugin_build(src, tmp_path)
    assert trt.log.builds == [] and not (tmp_path / "a").exists()


def plugin_build(src, tmp_path):
    raw = json.loads((src / "manifest.json").read_text())
    raw["moe_impl"] = "plugin"
    (src / "manifest.json").write_text(json.dumps(raw))
    plugin = tmp_path / "libmoe_llava_plugin.so"
    plugin.write_bytes(b"\x7fELF fake plugin")
    export_tensorrt(from_onnx=src, out=tmp_path / "b", gpu="agx-orin-64gb", max_seq=2048, workspace_mb=32,
                    plugin=plugin)


def test_gpu_names_boards_families_and_sizes():
    assert parse_board("auto") is None and parse_board("orin") is None and parse_board("thor").family == "thor"
    assert parse_board("orin-nano").name == "orin-nano-8gb" and parse_board("Thor").memory_gib == 128
    assert parse_board("24GB").usable_bytes == int(23.5 * 2**30)
    with pytest.raises(UserError, match="--gpu 'orin-nano-2gb': expected auto, a GPU family"):
        parse_board("orin-nano-2gb")
