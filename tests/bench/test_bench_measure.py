"""The per-backend measurement process: sane (positive) figures, a fixed number of decode steps, own RSS."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))

from benchmarks.measure import METRICS, WorkerSpec, measure_interleaved, peak_rss_mb  # noqa: E402
from rt_helpers import build_tiny_export  # noqa: E402
from runtime.errors import UserError  # noqa: E402


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "engine"
    build_tiny_export(out)
    return out


def test_runtime_worker_returns_positive_figures(engine_dir):
    spec = WorkerSpec("onnxruntime", str(engine_dir), "What is in the image?", new_tokens=5, threads=1)
    (result,) = measure_interleaved({"runtime": spec}, warmup=1, runs=2).values()
    for metric in METRICS:
        assert result[metric] > 0, metric
    assert result["runs"] == 2
    assert len(result["token_ids"]) == 5  # EOS ignored: always new_tokens tokens
    assert result["decode_tok_s"] == pytest.approx(1e3 / result["decode_ms_per_token"])
    assert result["ttft_ms"] >= result["prefill_ms"]
    assert 0 < result["load_peak_rss_mb"] <= result["peak_rss_mb"] < 4096
    assert result["prompt_tokens"] > 4
    assert result["imports_onnxruntime"] and not result["imports_torch"]  # torch would count against the runtime


def test_two_workers_interleave_and_report_their_own_memory(engine_dir):
    spec = WorkerSpec("onnxruntime", str(engine_dir), "Hi", new_tokens=2, threads=1)
    results = measure_interleaved({"a": spec, "b": spec}, warmup=0, runs=1)
    assert set(results) == {"a", "b"}
    # a fresh process, not this (pytest + torch) one: VmHWM does not inherit the parent's peak
    assert all(r["peak_rss_mb"] < peak_rss_mb() + 500 for r in results.values())


def test_a_failing_worker_names_itself(tmp_path):
    spec = WorkerSpec("onnxruntime", str(tmp_path / "missing"), "Hi", new_tokens=2, threads=1)
    with pytest.raises(UserError, match="onnxruntime|runtime"):
        measure_interleaved({"runtime": spec}, warmup=0, runs=1)
