"""`moe-export --target tensorrt` without TensorRT: exit 2, one line that points at --target onnx, nothing written;
and the --from-onnx path imports no torch (it must run on a Jetson with only the runtime installed)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import cli

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("source", [["--model", "demo"], ["--from-onnx", "ONNX"]])
def test_without_tensorrt_fails_cleanly_and_writes_nothing(tmp_path, capsys, no_tensorrt, source):
    out = tmp_path / "nested" / "engines"
    source = [str(tmp_path / "missing-onnx") if a == "ONNX" else a for a in source]
    code = cli.export_main([*source, "--target", "tensorrt", "--precision", "fp16", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "--target onnx" in lines[0] and "tensorrt" in lines[0] and "JetPack" in lines[0]
    assert captured.out == ""
    assert list(tmp_path.iterdir()) == []  # not even the parent directory


def test_a_directory_named_tensorrt_is_not_tensorrt(tmp_path, monkeypatch, capsys):
    """A directory named tensorrt on sys.path (a stray ./tensorrt, or a tests/tensorrt under pytest, which puts
    tests/ on sys.path - hence this directory's name) imports as a namespace package; it is not TensorRT."""
    (tmp_path / "shadow" / "tensorrt").mkdir(parents=True)
    monkeypatch.syspath_prepend(str(tmp_path / "shadow"))
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    import tensorrt
    if getattr(tensorrt, "__version__", None) is not None:
        pytest.skip("real TensorRT bindings are installed")
    assert cli.export_main(["--from-onnx", str(tmp_path), "--target", "tensorrt", "--out",
                            str(tmp_path / "out")]) == 2
    assert "--target onnx" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_from_onnx_path_imports_no_torch(tmp_path):
    """Up to the TensorRT import (absent here, or a stand-in that stops right there) no torch/onnx/export-of-
    torch module is loaded: building on a device needs only the runtime install."""
    code = (
        "import json, sys\n"
        "sys.modules['tensorrt'] = None\n"
        "import cli\n"
        f"rc = cli.export_main(['--from-onnx', {str(tmp_path)!r}, '--target', 'tensorrt', '--out', "
        f"{str(tmp_path / 'out')!r}])\n"
        "import export.tensorrt_build, export.tensorrt_profiles, export.tensorrt_checks, export.tensorrt_trtexec\n"
        "print(json.dumps([rc, sorted(m for m in ('torch', 'transformers', 'onnx', 'moe_llava', "
        "'export.onnx_export', 'export.moe_lowering') if m in sys.modules)]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [2, []]
