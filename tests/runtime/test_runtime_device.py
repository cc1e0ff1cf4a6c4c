"""--device auto|cpu|cuda: the choice for each engine library, its stderr line and its one-line refusals."""
from __future__ import annotations

import numpy as np
import pytest

from cli import run_main
from cli_helpers import run_cli
from rt_helpers import build_tiny_export
from runtime import device
from runtime.device import Device, choose_onnxruntime, choose_tensorrt, confirm_onnxruntime
from runtime.errors import UserError


class FakeOrt:
    def __init__(self, providers):
        self.providers, self.__version__ = providers, "1.23.1"

    def get_available_providers(self):
        return self.providers


CPU_ORT = FakeOrt(["CPUExecutionProvider"])
GPU_ORT = FakeOrt(["CUDAExecutionProvider", "CPUExecutionProvider"])


@pytest.fixture
def gpus(monkeypatch):
    """Sets the GPUs the CUDA driver 'reports'."""
    def set_gpus(names):
        monkeypatch.setattr(device, "cuda_gpus", lambda: list(names))
    return set_gpus


def test_auto_picks_cuda_only_with_the_provider_and_a_gpu(gpus):
    gpus(["NVIDIA H100"])
    choice = choose_onnxruntime(Device.AUTO, GPU_ORT)
    assert choice.device is Device.CUDA and "NVIDIA H100" in choice.detail
    assert choose_onnxruntime(Device.AUTO, CPU_ORT).device is Device.CPU
    assert choose_onnxruntime(Device.CPU, GPU_ORT).device is Device.CPU
    gpus([])
    choice = choose_onnxruntime(Device.AUTO, GPU_ORT)
    assert choice.device is Device.CPU and "no GPU" in choice.detail


def test_cuda_without_it_is_one_line_naming_the_fix(gpus):
    gpus(["NVIDIA H100"])
    with pytest.raises(UserError, match=r"--device cuda: onnxruntime 1.23.1 has no CUDAExecutionProvider.*\[gpu\]"):
        choose_onnxruntime(Device.CUDA, CPU_ORT)
    gpus([])
    with pytest.raises(UserError, match="the CUDA driver reports no GPU"):
        choose_onnxruntime(Device.CUDA, GPU_ORT)
    with pytest.raises(UserError, match="tensorrt backend runs on CUDA only"):
        choose_tensorrt(Device.CPU)


def test_a_cuda_provider_that_did_not_start_is_refused(gpus):
    class Session:
        def get_providers(self):
            return ["CPUExecutionProvider"]  # what onnxruntime does when the CUDA provider fails to load

    class Engine:
        sessions = {"decoder": type("Part", (), {"session": Session()})()}

    gpus(["NVIDIA H100"])
    with pytest.raises(UserError, match="could not start its CUDA provider"):
        confirm_onnxruntime(Engine(), choose_onnxruntime(Device.CUDA, GPU_ORT))
    confirm_onnxruntime(Engine(), choose_onnxruntime(Device.CPU, GPU_ORT))  # the CPU needs no check


def test_moe_run_says_which_device_runs(tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    build_tiny_export(tmp_path, np.float32)
    code, _, err = run_cli(run_main, ["--engine-dir", str(tmp_path), "--prompt", "Hi", "--max-new-tokens", "2",
                                      "--device", "cpu"], capsys)
    assert code == 0 and "moe-run: running on CPU (onnxruntime" in err
    if "CUDAExecutionProvider" in ort.get_available_providers():
        return  # the refusal below needs a CPU-only onnxruntime
    code, out, err = run_cli(run_main, ["--engine-dir", str(tmp_path), "--prompt", "Hi", "--device", "cuda"], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("error: --device cuda: onnxruntime") and "onnxruntime-gpu" in err
