"""Dry runs of two gpu-check steps without a GPU: their logic against stand-ins, so the one real run on a GPU
machine does not fail on a bug that a CPU could have shown. Nothing here is a GPU result.

- cuda-helpers against the project's host-memory stand-in of cuda.bindings.runtime (tests/trt/fake_trt.py);
- moe-timing on the CPU at a small shape, a float64 reference standing in for the CUDA kernels.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trt"))

import fake_trt  # noqa: E402
from gpu_check import cuda_helpers, moe_timing  # noqa: E402
from gpu_check.common import StepFailed  # noqa: E402


class Cudart(fake_trt.FakeCudart):
    """The stand-in plus the calls only the check makes (memory info, capture status, versions)."""
    cudaStreamCaptureStatus = SimpleNamespace(cudaStreamCaptureStatusNone=0, cudaStreamCaptureStatusActive=1)
    TOTAL = 80 << 30

    def cudaMemGetInfo(self):
        return fake_trt.cudaError_t.cudaSuccess, self.TOTAL - sum(a.nbytes for a in self.device.values()), self.TOTAL

    def cudaStreamIsCapturing(self, stream):
        return fake_trt.cudaError_t.cudaSuccess, int(self.capturing is not None)

    def cudaRuntimeGetVersion(self):
        return fake_trt.cudaError_t.cudaSuccess, 13000

    def cudaDriverGetVersion(self):
        return fake_trt.cudaError_t.cudaSuccess, 13000


def test_cuda_helpers_step_logic(monkeypatch):
    rt = Cudart(sm=(9, 0), name=b"Stand-in", memory_limit=1 << 30)
    monkeypatch.setattr(cuda_helpers, "import_cudart", lambda: rt)
    summary, figures = cuda_helpers.run()
    assert figures["compute_capability"] == "9.0" and figures["returned_by_close_mib"] >= 256
    assert "out of GPU memory" in figures["oom_message"] and rt.device == {} and rt.streams == 0

    rt = Cudart(sm=(9, 0), name=b"Stand-in", memory_limit=1 << 30)
    rt.cudaGraphLaunch = lambda graph, stream: (fake_trt.cudaError_t.cudaSuccess,)  # a replay that copies nothing
    monkeypatch.setattr(cuda_helpers, "import_cudart", lambda: rt)
    with pytest.raises(StepFailed, match="graph replay did not copy"):
        cuda_helpers.run()


class ReferenceKernels:
    """ext.moe_forward's contract in float64 (SwiGLU, renormalised top-k, no biases)."""

    def moe_forward(self, x, logits, w1, b1, w2, b2, top_k, activation, normalize):
        import torch
        w, ids = torch.softmax(logits.float(), -1).topk(top_k, -1)
        w = w / w.sum(-1, keepdim=True)
        out, inter = torch.zeros(x.shape, dtype=torch.float64), w2.shape[2]
        for t in range(x.shape[0]):
            for k in range(top_k):
                e = ids[t, k]
                f = x[t].double() @ w1[e].double().T
                out[t] += w[t, k].double() * ((torch.nn.functional.silu(f[:inter]) * f[inter:]) @ w2[e].double().T)
        return out.half(), ids.int(), w


def test_moe_timing_step_logic(monkeypatch):
    torch = pytest.importorskip("torch")
    from benchmarks.plugin_kernels import LayerShape

    def median_ms(torch, fn, iters):
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    monkeypatch.setattr(moe_timing, "DEVICE", "cpu")
    monkeypatch.setattr(moe_timing, "MODELS", {"stablelm": LayerShape(H=64, I=96, E=4, K=2, activation=0)})
    monkeypatch.setattr(moe_timing, "median_ms", median_ms)
    monkeypatch.setitem(moe_timing.ITERS, 9, 1)
    layer = moe_timing.stablelm_layer(torch)
    r = moe_timing.time_tokens(torch, ReferenceKernels(), layer, 9, peak=100.0)
    assert r["max_abs_diff"] < 1e-2 * r["output_scale"] and 1 <= r["experts_read"] <= 4
    assert r["mbytes_read"] == pytest.approx((r["experts_read"] * 3 * 96 * 64 * 2 + 2 * 9 * 64 * 2) / 1e6)

    class WrongKernels(ReferenceKernels):
        def moe_forward(self, *args, **kw):
            out, ids, w = super().moe_forward(*args, **kw)
            return out + 1, ids, w
    with pytest.raises(StepFailed, match="plugin and PyTorch MoE layers differ"):
        moe_timing.time_tokens(torch, WrongKernels(), layer, 9, peak=100.0)
