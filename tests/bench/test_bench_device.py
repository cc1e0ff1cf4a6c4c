"""moe-bench --device: one device for both sides, refusals, and CUDA-synchronised laps (no GPU needed)."""
from __future__ import annotations

import numpy as np
import pytest

from benchmarks import cuda_device
from benchmarks.command import build_parser as bench_parser
from benchmarks.measure import Side
from runtime.device import Device, DeviceChoice
from runtime.errors import UserError


def fake_choices(monkeypatch, cuda_capable: set[str]):
    """choose_for as if exactly the backends in `cuda_capable` could use a GPU here."""
    def choose_for(backend, requested):
        if backend in cuda_capable and requested is not Device.CPU:
            return DeviceChoice(Device.CUDA, backend)
        if requested is Device.CUDA:
            raise UserError(f"--device cuda: {backend} cannot")
        return DeviceChoice(Device.CPU, backend)
    monkeypatch.setattr(cuda_device, "choose_for", choose_for)


def test_auto_takes_cuda_only_when_every_side_can(monkeypatch):
    fake_choices(monkeypatch, {"pytorch", "onnxruntime"})
    assert cuda_device.choose_bench_device(Device.AUTO, ["pytorch", "onnxruntime"]) is Device.CUDA
    fake_choices(monkeypatch, {"pytorch"})  # a CUDA torch but the CPU onnxruntime: both sides stay on the CPU
    assert cuda_device.choose_bench_device(Device.AUTO, ["pytorch", "onnxruntime"]) is Device.CPU
    with pytest.raises(UserError, match="onnxruntime cannot"):
        cuda_device.choose_bench_device(Device.CUDA, ["pytorch", "onnxruntime"])
    with pytest.raises(UserError, match="tensorrt backend runs on CUDA only"):
        cuda_device.choose_bench_device(Device.CPU, ["pytorch", "tensorrt"])


def test_one_runtime_per_run():
    with pytest.raises(SystemExit):
        bench_parser().parse_args(["--model", "x", "--backends", "onnxruntime,tensorrt"])
    args = bench_parser().parse_args(["--model", "x", "--backends", "pytorch,tensorrt", "--device", "cuda"])
    assert args.backends == ["pytorch", "tensorrt"] and args.device == "cuda"


def test_every_lap_waits_for_the_device():
    """On CUDA, PyTorch returns before the GPU finishes: each lap must synchronise first, or it times launches."""
    events = []

    class Engine:
        def prefill(self, embeds):
            events.append("prefill")
            return np.zeros(5)

        def decode(self, token):
            events.append("decode")
            return np.zeros(5)

    class Pipeline:
        engine = Engine()

        def preprocess(self, image):
            return np.zeros((3, 2, 2), np.float32)

        def prompt_ids(self, prompt, with_image):
            return [1, 2]

        def prompt_embeds(self, ids, visual):
            return np.zeros((3, 4), np.float32)

    side = Side(Pipeline(), lambda px: events.append("vision") or px, lambda f: events.append("projector") or f,
                lambda: events.append("sync"))
    result = side.run(object.__new__(type("Img", (), {})), "q", new_tokens=3)
    assert events == ["sync", "vision", "sync", "projector", "sync", "prefill", "sync", "decode", "decode", "sync"]
    assert result["token_ids"] == [0, 0, 0]
