"""Fixtures for the TensorRT tests: the runtime tests' tiny export, and the recording stand-ins of fake_trt.

The directory is tests/trt, not tests/tensorrt: pytest puts tests/ on sys.path, where a tensorrt directory would
import as a namespace package `tensorrt` wherever the real bindings are absent (modelopt and others probe it).
"""
from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
for path in (HERE, HERE.parent / "runtime"):  # fake_trt, rt_helpers
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


@pytest.fixture
def no_tensorrt(monkeypatch):
    """`import tensorrt` raises ImportError, whatever this machine has."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)


@pytest.fixture
def fake_stack(monkeypatch):
    """Installs fake `tensorrt` and `cuda.bindings.runtime` (see fake_trt.py); yields (trt, cudart)."""
    import fake_trt
    import runtime.tensorrt.libraries as libraries

    cudart = fake_trt.FakeCudart()
    trt = fake_trt.make_tensorrt(cudart)
    cuda = types.ModuleType("cuda")
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime, cuda.bindings = cudart, bindings
    for name, module in (("tensorrt", trt), ("cuda", cuda), ("cuda.bindings", bindings),
                         ("cuda.bindings.runtime", cudart)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(libraries, "_LOGGER", None)  # the logger class derives from the fake ILogger
    monkeypatch.setattr(libraries, "_PLUGINS", {})
    monkeypatch.setattr(libraries, "_BUILTIN_PLUGINS", set())
    monkeypatch.delenv("MOE_LLAVA_PLUGIN", raising=False)
    yield trt, cudart
