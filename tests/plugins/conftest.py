"""Lets the plugin tests import their helper module (plugin_reference) whatever pytest's import mode, and builds
the CPU emulation of the kernels once for every emulated test."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from plugin_reference import PLUGIN_DIR, cuda_include_dir  # noqa: E402


@pytest.fixture(scope="session")
def driver(tmp_path_factory):
    """tests/plugins/emu_driver.cpp over runtime/plugins/moe_kernels.cu, CUDA emulated on the CPU."""
    gxx = shutil.which("g++")
    inc = cuda_include_dir()
    if gxx is None or inc is None:
        pytest.skip("needs g++ and the CUDA headers (cuda_runtime_api.h, cuda_fp16.h)")
    exe = tmp_path_factory.mktemp("emu") / "emu_driver"
    # -fno-strict-aliasing: the kernels type-pun 16-byte vectors (uint4 <-> __half), fine for nvcc, not for g++ -O2
    cmd = [gxx, "-std=c++17", "-O2", "-fno-strict-aliasing", "-Wall", "-Wno-unknown-pragmas", f"-I{inc}",
           f"-I{PLUGIN_DIR}", "-include", str(HERE / "cuda_cpu_emulation.h"), "-x", "c++",
           str(PLUGIN_DIR / "moe_kernels.cu"), "-x", "none", str(HERE / "emu_driver.cpp"), "-o", str(exe)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"emulation build failed:\n{' '.join(cmd)}\n{res.stderr}"
    return exe
