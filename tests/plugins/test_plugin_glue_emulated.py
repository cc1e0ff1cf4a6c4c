"""The IPluginV3 glue driven like TensorRT would drive it, with TensorRT's headers but without TensorRT.

plugin_glue_driver.cpp calls getCreators, createPlugin (good and bad fields), the build-phase negotiation,
configurePlugin, getWorkspaceSize, the serialisation round trip, clone/attachToContext and finally enqueue, whose
kernels run under the CPU emulation; the output is compared with the NumPy reference. Skips without TensorRT
headers (CI) - set TENSORRT_INCLUDE_DIR to a directory holding NvInferRuntime.h to run it.
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from plugin_reference import (PLUGIN_DIR, MoeCase, assert_close_to_reference, cuda_include_dir, reference_moe,
                              tensorrt_include_dir)

HERE = PLUGIN_DIR.parents[1] / "tests" / "plugins"


@pytest.fixture(scope="module")
def glue_driver(tmp_path_factory):
    gxx, cuda_inc, trt_inc = shutil.which("g++"), cuda_include_dir(), tensorrt_include_dir()
    if gxx is None or cuda_inc is None:
        pytest.skip("needs g++ and the CUDA headers")
    if trt_inc is None:
        pytest.skip("TensorRT headers not found (set TENSORRT_INCLUDE_DIR to the directory holding NvInferRuntime.h)")
    exe = tmp_path_factory.mktemp("glue") / "plugin_glue_driver"
    cmd = [gxx, "-std=c++17", "-O1", "-Wall", "-Wno-unknown-pragmas", "-isystem", str(trt_inc),
           "-isystem", str(cuda_inc), f"-I{PLUGIN_DIR}", "-include", str(HERE / "cuda_cpu_emulation.h"),
           "-x", "c++", str(PLUGIN_DIR / "moe_kernels.cu"), str(PLUGIN_DIR / "moe_plugin.cpp"),
           str(HERE / "plugin_glue_driver.cpp"), "-o", str(exe)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"glue build failed:\n{' '.join(cmd)}\n{res.stderr}"
    return exe


def test_plugin_glue_like_tensorrt(glue_driver, tmp_path):
    case = MoeCase(T=6, E=4, K=2, H=48, I=32, activation="swiglu", dtype="float16", seed=11)
    for name, arr in zip(["hidden", "logits", "fc1_w", "fc1_b", "fc2_w", "fc2_b"], case.inputs()):
        np.ascontiguousarray(arr).tofile(tmp_path / f"{name}.bin")
    args = [case.T, case.E, case.K, case.H, case.I, tmp_path]
    res = subprocess.run([str(glue_driver), *map(str, args)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    out = np.fromfile(tmp_path / "out.bin", dtype=np.float16).reshape(case.T, case.H)
    assert_close_to_reference(out, reference_moe(case)[0], case.dtype)


def test_static_registration_uses_the_plugin_namespace(tmp_path):
    """The MOE_LLAVA_STATIC_REGISTRATION build registers its creator under "moe_llava" - the namespace the
    ONNX nodes name - not under "" as REGISTER_TENSORRT_PLUGIN would (recorded by a stand-in registry)."""
    gxx, cuda_inc, trt_inc = shutil.which("g++"), cuda_include_dir(), tensorrt_include_dir()
    if gxx is None or cuda_inc is None or trt_inc is None:
        pytest.skip("needs g++, the CUDA headers and TensorRT headers (TENSORRT_INCLUDE_DIR)")
    exe = tmp_path / "static_registration"
    # Only load-time code runs: the kernels and CUDA stay unlinked (a non-PIE executable tolerates that) rather
    # than compiled under the emulation, which takes ten times longer.
    cmd = [gxx, "-std=c++17", "-O0", "-Wno-deprecated-declarations", "-DMOE_LLAVA_STATIC_REGISTRATION",
           "-isystem", str(trt_inc), "-isystem", str(cuda_inc), f"-I{PLUGIN_DIR}", str(PLUGIN_DIR / "moe_plugin.cpp"),
           str(HERE / "static_registration_driver.cpp"), "-no-pie", "-Wl,--unresolved-symbols=ignore-in-object-files",
           "-o", str(exe)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stderr}"
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.split("\n")[:-1] == ["MoELlavaMoE 1 moe_llava"], run.stdout + run.stderr
