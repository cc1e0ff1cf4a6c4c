"""Steps `lifecycle`, `memcheck`, `racecheck`: the real IPluginV3 through TensorRT's life cycle on the GPU.

gpu_check/plugin_lifecycle.cpp is built with nvcc against the open-source TensorRT headers (no libnvinfer) and run
per case; it writes the output of an aligned enqueue, a misaligned one (every I/O tensor one element off 16-byte
alignment) and a CUDA-graph replay, each compared here with the NumPy reference of the node contract. The sanitizer
steps run the same driver under compute-sanitizer.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpu_check.common import BUILD_DIR, PLUGIN_DIR, REPO, StepFailed, cuda_tool, import_plugin_reference, run_logged

DRIVER_SOURCE = Path(__file__).with_name("plugin_lifecycle.cpp")
DRIVER = BUILD_DIR / "plugin_lifecycle"
OUTPUTS = ("aligned", "misaligned", "graph")
BUILD_TIMEOUT_S = 240
RUN_TIMEOUT_S = 60
SANITIZER_TIMEOUT_S = 150


@dataclass(frozen=True)
class Case:
    """One driver run: SwiGLU MoE node, H and I multiples of 8 so the aligned run takes the vector paths."""

    T: int
    dtype: str  # "float16" | "float32"
    E: int = 4
    K: int = 2
    H: int = 256
    I: int = 128

    @property
    def name(self) -> str:
        return f"T{self.T}-{'fp16' if self.dtype == 'float16' else 'fp32'}"


# T=1 takes the skinny decode kernel, T=37 and T=300 the tiled ones (tensor cores for fp16).
CASES = [Case(1, "float16"), Case(37, "float16"), Case(300, "float16"), Case(37, "float32")]
SANITIZER_CASES = [Case(1, "float16"), Case(37, "float16")]


def tensorrt_include_dir() -> Path | None:
    """$TENSORRT_INCLUDE_DIR, the fetched headers in .trt-headers/include, or an installed TensorRT's."""
    fetched = REPO / ".trt-headers" / "include"
    if not os.environ.get("TENSORRT_INCLUDE_DIR") and (fetched / "NvInferRuntime.h").is_file():
        return fetched
    return import_plugin_reference().tensorrt_include_dir()


def gpu_arch() -> str:
    """-arch for nvcc: the GPU's compute capability from nvidia-smi, else nvcc's `native`."""
    try:
        cap = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.split()[0]
        return "sm_" + cap.replace(".", "")
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "native"


def build_driver() -> Path:
    """Builds the driver unless it is newer than every source; raises StepFailed with the compiler's reason."""
    sources = [DRIVER_SOURCE, PLUGIN_DIR / "moe_kernels.cu", PLUGIN_DIR / "moe_plugin.cpp"]
    headers = list(PLUGIN_DIR.glob("*.h")) + list(PLUGIN_DIR.glob("*.cuh"))
    if DRIVER.is_file() and DRIVER.stat().st_mtime > max(p.stat().st_mtime for p in sources + headers):
        return DRIVER
    nvcc, trt_inc = cuda_tool("nvcc"), tensorrt_include_dir()
    if nvcc is None:
        raise StepFailed("nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)")
    if trt_inc is None:
        raise StepFailed("TensorRT headers not found: put NVIDIA/TensorRT's include/ (v10.3.0) in .trt-headers/include "
                         "or set TENSORRT_INCLUDE_DIR")
    DRIVER.parent.mkdir(parents=True, exist_ok=True)
    cmd = [nvcc, "-std=c++17", "-O2", "-lineinfo", f"-arch={gpu_arch()}", f"-I{PLUGIN_DIR}", "-isystem", trt_inc,
           *sources, "-o", DRIVER]
    res = run_logged(cmd, BUILD_TIMEOUT_S)
    if res.returncode != 0:
        DRIVER.unlink(missing_ok=True)
        raise StepFailed(f"the lifecycle driver did not build (nvcc exit status {res.returncode})")
    return DRIVER


def write_inputs(case: Case, work: Path):
    """The case's random inputs as raw files for the driver. -> the reference MoeCase."""
    ref = import_plugin_reference()
    moe = ref.MoeCase(T=case.T, E=case.E, K=case.K, H=case.H, I=case.I, activation="swiglu", dtype=case.dtype,
                      seed=case.T)
    work.mkdir(parents=True, exist_ok=True)
    for name, arr in zip(["hidden", "logits", "fc1_w", "fc1_b", "fc2_w", "fc2_b"], moe.inputs()):
        np.ascontiguousarray(arr).tofile(work / f"{name}.bin")
    for name in OUTPUTS:
        (work / f"out_{name}.bin").unlink(missing_ok=True)
    return moe


def driver_command(case: Case, work: Path) -> list:
    dtype = "fp16" if case.dtype == "float16" else "fp32"
    return [DRIVER, case.T, case.E, case.K, case.H, case.I, dtype, work]


def check_outputs(case: Case, moe, work: Path) -> dict:
    """Every output against the reference (graph replay bit-identical to eager: reported). -> figures"""
    ref = import_plugin_reference()
    expected = ref.reference_moe(moe)[0]
    outs = {}
    for name in OUTPUTS:
        path = work / f"out_{name}.bin"
        if not path.is_file():
            raise StepFailed(f"{case.name}: the driver wrote no out_{name}.bin")
        outs[name] = np.fromfile(path, dtype=case.dtype).reshape(case.T, case.H)
    figures = {f"{n}_max_abs_err": float(np.abs(o.astype(np.float64) - expected).max()) for n, o in outs.items()}
    figures["graph_bitwise_equal_eager"] = bool(np.array_equal(outs["graph"], outs["aligned"]))
    figures["misaligned_max_abs_diff_vs_aligned"] = float(
        np.abs(outs["misaligned"].astype(np.float64) - outs["aligned"]).max())
    for name, out in outs.items():
        try:
            ref.assert_close_to_reference(out, expected, case.dtype)
        except AssertionError as exc:
            raise StepFailed(f"{case.name} {name} output differs from the reference: {exc}", figures) from None
    return figures


def run_case(case: Case, prefix: list, timeout: float) -> dict:
    work = BUILD_DIR / "work" / case.name
    moe = write_inputs(case, work)
    res = run_logged([*prefix, *driver_command(case, work)], timeout)
    if res.returncode != 0:
        failed = [line for line in res.stdout.splitlines() if "FAILED" in line or "ERROR" in line][:3]
        raise StepFailed(f"{case.name}: exit status {res.returncode}: " + ("; ".join(failed) or "see the log"))
    figures = check_outputs(case, moe, work)
    lines = res.stdout.splitlines()
    ws = [line.split()[1] for line in lines if line.startswith("workspace_bytes")]
    if ws:
        figures["workspace_bytes"] = int(ws[0])
    summaries = [line.strip("= ").strip() for line in lines if "SUMMARY" in line]  # compute-sanitizer's totals
    if summaries:
        figures["sanitizer"] = summaries
    return figures


def run() -> tuple[str, dict]:
    build_driver()
    figures = {c.name: run_case(c, [], RUN_TIMEOUT_S) for c in CASES}
    bitwise = sum(f["graph_bitwise_equal_eager"] for f in figures.values())
    return (f"{len(CASES)} cases ({', '.join(figures)}): aligned, misaligned and graph-replayed enqueues match the "
            f"reference; graph replay bit-identical to eager in {bitwise}/{len(CASES)}"), figures


def run_sanitizer(tool: str) -> tuple[str, dict]:
    sanitizer = cuda_tool("compute-sanitizer")
    if sanitizer is None:
        raise StepFailed("compute-sanitizer not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)")
    build_driver()
    prefix = [sanitizer, "--tool", tool, "--error-exitcode", "86", "--print-limit", "20"]
    if tool == "memcheck":
        prefix += ["--leak-check", "full"]
    figures = {}
    for case in SANITIZER_CASES:
        figures[case.name] = run_case(case, prefix, SANITIZER_TIMEOUT_S)
    return f"{tool}: no errors in {', '.join(figures)} (eager, misaligned and graph enqueues)", figures


def run_memcheck() -> tuple[str, dict]:
    return run_sanitizer("memcheck")


def run_racecheck() -> tuple[str, dict]:
    return run_sanitizer("racecheck")
