"""The machine under test: whether it has a GPU, and the versions the report records (no torch import here)."""

from __future__ import annotations

import platform
import re
import subprocess
from importlib import metadata

from gpu_check.common import REPO, cuda_tool

PACKAGES = ["torch", "cupy-cuda13x", "cupy-cuda12x", "cuda-bindings", "cuda-python", "cuda-core", "numpy",
            "onnxruntime", "onnxruntime-gpu", "tensorrt", "transformers"]


def _run(cmd: list[str]) -> str:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return res.stdout if res.returncode == 0 else ""


def gpu_names() -> list[str]:
    """Names of the NVIDIA GPUs nvidia-smi lists; [] without nvidia-smi, a driver or a GPU."""
    out = _run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"])
    return [line.strip() for line in out.splitlines() if line.strip()]


def nvidia_smi_fields() -> dict:
    out = _run(["nvidia-smi", "--query-gpu=name,driver_version,compute_cap,memory.total", "--format=csv,noheader"])
    values = [v.strip() for v in out.splitlines()[0].split(",")] if out.strip() else []
    fields = dict(zip(["device", "driver", "compute_capability", "memory"], values))
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", _run(["nvidia-smi"]))
    if cuda:
        fields["driver_cuda"] = cuda.group(1)
    return fields


def nvcc_version() -> str:
    nvcc = cuda_tool("nvcc")
    match = re.search(r"(V\d+\.\d+\.\d+)", _run([nvcc, "--version"]) if nvcc else "")
    return match.group(1) if match else "not found"


def package_versions() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def collect() -> dict:
    env = {"device": "unknown", **nvidia_smi_fields(), "nvcc": nvcc_version(),
           "compute_sanitizer": cuda_tool("compute-sanitizer") or "not found",
           "python": platform.python_version(), **package_versions()}
    commit = _run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]).strip()
    env["commit"] = commit or "unknown (no git checkout)"
    return env
