"""The plugin sources compile: the CUDA kernels (fp16/fp32 and INT4 experts) with nvcc for Orin (sm_87), Hopper
(sm_90) and, with CUDA >= 13, Thor (sm_110 in CUDA 13's numbering); the TensorRT glue
against TensorRT headers when some are found. Nothing runs on a GPU here (see test_plugin_kernels_*.py).
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from plugin_reference import PLUGIN_DIR, cuda_include_dir, tensorrt_include_dir

ARCHS = ["sm_87", "sm_90", "sm_110"]


def nvcc_knows(nvcc: str, arch: str) -> bool:
    """sm_110 exists from CUDA 13 on; toolkits list their targets in --list-gpu-arch (one too old for that
    option predates sm_110 but knows sm_87 and sm_90)."""
    res = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True)
    if res.returncode != 0:
        return arch != "sm_110"
    return f"compute_{arch[3:]}" in res.stdout


@pytest.fixture(scope="module")
def nvcc_results(tmp_path_factory):
    """Compiles moe_kernels.cu once per arch, all at once (~15-30 s each on one core). -> {arch: (cmd, rc, stderr)}"""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not on PATH")
    out_dir = tmp_path_factory.mktemp("nvcc")
    procs = {}
    for arch in ARCHS:
        if not nvcc_knows(nvcc, arch):
            continue
        cmd = [nvcc, "-std=c++17", "-c", f"-arch={arch}", str(PLUGIN_DIR / "moe_kernels.cu"), "-o",
               str(out_dir / f"moe_kernels_{arch}.o")]
        procs[arch] = (cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = {}
    for arch, (cmd, proc) in procs.items():
        _, err = proc.communicate(timeout=300)
        results[arch] = (cmd, proc.returncode, err)
    return results


@pytest.mark.parametrize("arch", ARCHS)
def test_kernels_compile_with_nvcc(nvcc_results, arch):
    if arch not in nvcc_results:
        pytest.skip(f"this nvcc does not target {arch}")
    cmd, rc, err = nvcc_results[arch]
    assert rc == 0, f"{' '.join(cmd)}\n{err}"


def test_plugin_glue_compiles_against_tensorrt_headers():
    gxx, trt_inc, cuda_inc = shutil.which("g++"), tensorrt_include_dir(), cuda_include_dir()
    if trt_inc is None:
        pytest.skip("TensorRT headers not found (set TENSORRT_INCLUDE_DIR to the directory holding NvInferRuntime.h)")
    if gxx is None or cuda_inc is None:
        pytest.skip("needs g++ and the CUDA headers")
    for static in ([], ["-DMOE_LLAVA_STATIC_REGISTRATION"]):
        cmd = [gxx, "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-isystem", str(trt_inc), "-isystem",
               str(cuda_inc), f"-I{PLUGIN_DIR}", *static, str(PLUGIN_DIR / "moe_plugin.cpp")]
        res = subprocess.run(cmd, capture_output=True, text=True)
        assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stderr}"
