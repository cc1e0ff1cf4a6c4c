"""A truncated or corrupt weights file ends in one line naming that file, exit code 2, no traceback.

Covered: safetensors shard (truncated data, garbage header), index naming a missing shard, pickled .bin,
ONNX graph, external .data of a graph. A TensorRT engine that does not deserialise is named by
runtime/trt_engine.py (TrtPart); it needs TensorRT and is not exercised here.
"""
import os
from pathlib import Path

import onnx
import pytest
import torch

from cli import run_main
from cli_helpers import run_cli
from rt_helpers import build_tiny_export
from tiny import write_tiny_checkpoint


def one_line_naming(code: int, err: str, name: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: ") and name in lines[0], lines[0]


def run_model(directory: Path, capsys):
    return run_cli(run_main, ["--model", str(directory), "--prompt", "hi", "--max-new-tokens", "1"], capsys)


def truncate(path: Path, keep: float = 0.5) -> None:
    os.truncate(path, int(path.stat().st_size * keep))


@pytest.fixture()
def sharded(tmp_path):
    write_tiny_checkpoint(tmp_path, max_shard_bytes=100_000)
    return tmp_path


def test_truncated_safetensors_shard_is_named(sharded, capsys):
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    truncate(shard)
    code, _, err = run_model(sharded, capsys)
    one_line_naming(code, err, shard.name)
    assert "truncated" in err


def test_garbage_safetensors_header_is_named(sharded, capsys):
    shard = sorted(sharded.glob("model-*.safetensors"))[0]
    with open(shard, "r+b") as f:
        f.seek(8)
        f.write(b"\xff" * 16)
    code, _, err = run_model(sharded, capsys)
    one_line_naming(code, err, shard.name)


def test_index_naming_a_missing_shard(sharded, capsys):
    shard = sorted(sharded.glob("model-*.safetensors"))[-1]
    shard.unlink()
    code, _, err = run_model(sharded, capsys)
    one_line_naming(code, err, shard.name)


def test_truncated_bin_is_named(tmp_path, capsys):
    write_tiny_checkpoint(tmp_path)
    from safetensors.torch import load_file
    torch.save(load_file(tmp_path / "model.safetensors"), tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
    truncate(tmp_path / "pytorch_model.bin")
    code, _, err = run_model(tmp_path, capsys)
    one_line_naming(code, err, "pytorch_model.bin")


def run_engine(directory: Path, capsys):
    return run_cli(run_main, ["--engine-dir", str(directory), "--prompt", "hi", "--max-new-tokens", "1"], capsys)


def test_truncated_onnx_graph_is_named(tmp_path, capsys):
    build_tiny_export(tmp_path)
    truncate(tmp_path / "decoder.onnx")
    code, _, err = run_engine(tmp_path, capsys)
    one_line_naming(code, err, "decoder.onnx")


def test_truncated_external_data_is_named(tmp_path, capsys):
    build_tiny_export(tmp_path)
    graph = onnx.load(str(tmp_path / "projector.onnx"))
    onnx.save(graph, str(tmp_path / "projector.onnx"), save_as_external_data=True,
              location="projector.onnx.data", size_threshold=0)
    truncate(tmp_path / "projector.onnx.data")
    code, _, err = run_engine(tmp_path, capsys)
    one_line_naming(code, err, "projector.onnx.data")
