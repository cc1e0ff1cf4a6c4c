"""The ONNX Runtime package is chosen by extra: the base must not name one, or it would shadow onnxruntime-gpu
(both install the same `onnxruntime` module, the last one installed wins)."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

PYPROJECT = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())


def names(requirements: list[str]) -> set[str]:
    return {re.match(r"[A-Za-z0-9_.\-]+(\[[^\]]*\])?", r).group(0).lower() for r in requirements}


def test_base_names_no_onnxruntime_and_each_extra_names_one():
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert not {n for n in names(PYPROJECT["project"]["dependencies"]) if n.startswith("onnxruntime")}
    assert names(extras["cpu"]) == {"onnxruntime"}
    assert names(extras["gpu"]) == {"onnxruntime-gpu"}
    # `pip install .[runtime]` stays a torch-free CPU runtime (with moe-serve's HTTP stack)
    assert names(extras["runtime"]) == {"moe-llava-edge[cpu,serve]"}
    assert "moe-llava-edge[cpu,export,train,quant,serve]" in names(extras["dev"])  # make install: CPU onnxruntime


def test_no_extra_but_cpu_pulls_the_cpu_package():
    """[gpu] combined with any other extra must not also install the CPU package."""
    extras = PYPROJECT["project"]["optional-dependencies"]
    for extra, requirements in extras.items():
        if extra not in ("cpu", "runtime", "dev"):
            assert "onnxruntime" not in names(requirements), extra
