"""What the figures were measured on (goes into the JSON next to them)."""
from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def machine_info(threads: int, load_before: float | None = None) -> dict:
    """`load_before`: the 1-minute load average before measuring (other processes skew every timing)."""
    return {"cpu": _cpu_name(), "logical_cpus": os.cpu_count(), "threads": threads, "memory_gb": _memory_gb(),
            "load_average_1m_before": load_before, "load_average_1m_after": load_average(), "os": platform.platform(),
            "python": platform.python_version(), "packages": _versions(), "gpu": _gpu_name()}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gb() -> float | None:
    try:
        total_kb = int(Path("/proc/meminfo").read_text().split()[1])
        return round(total_kb / (1 << 20), 1)
    except (OSError, ValueError, IndexError):
        return None


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _versions() -> dict[str, str]:
    out = {}
    for name in ("numpy", "onnxruntime", "onnxruntime-gpu", "torch", "transformers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def busy_warning(machine: dict) -> str | None:
    """A line for the table when other processes were competing for the cores while we measured."""
    load, cpus = machine.get("load_average_1m_before"), machine.get("logical_cpus") or 1
    if load is None or load <= 0.5 * cpus:
        return None
    return (f"warning: the machine was busy (1-min load {load:.1f} on {cpus} CPUs before measuring): timings are "
            "inflated and noisy; interleaving keeps the ratios fairer, but eager PyTorch's OpenMP threads suffer most")


def _gpu_name() -> str | None:
    """The GPU torch sees, for the record (settings.device says whether the bench ran on it)."""
    try:
        import torch
        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - no torch or a broken CUDA install both mean "no GPU figures"
        return None
