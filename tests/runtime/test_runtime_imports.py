"""The Jetson rule: importing any runtime module pulls in neither torch nor transformers (nor, eagerly,
onnxruntime or tensorrt). Checked in a fresh interpreter so other tests' imports cannot mask a violation."""
from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import runtime

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN = ("torch", "transformers", "moe_llava", "export", "onnxruntime", "tensorrt")


def runtime_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(runtime.__path__, "runtime."))


def test_runtime_modules_import_without_heavy_dependencies():
    modules = runtime_modules()
    assert {"runtime.preprocess", "runtime.generation", "runtime.ort_engine", "runtime.pipeline"} <= set(modules)
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(json.dumps(sorted(m for m in {FORBIDDEN!r} if m in sys.modules)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
