"""moe-bench end to end on tiny inputs: the JSON schema of a 1-run bench, the plots, argument errors."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))

import benchmarks.command as command  # noqa: E402
from cli import bench_main  # noqa: E402
from benchmarks.report import plot_scaling, scaling_table  # noqa: E402
from rt_helpers import build_tiny_export  # noqa: E402
from tiny import write_tiny_checkpoint  # noqa: E402

SIDE_KEYS = {"vision_ms", "projector_ms", "ttft_ms", "decode_tok_s", "peak_rss_mb"}
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-cmd")
    write_tiny_checkpoint(root / "model")
    # A hand-built export (no torch export: seconds, not a minute). It is not the same model as the checkpoint,
    # which the schema does not care about.
    build_tiny_export(root / "engine")
    return root


def test_one_run_bench_writes_the_documented_json_and_a_png(inputs, tmp_path, monkeypatch, capsys):
    bandwidth = command.measure_bandwidth
    monkeypatch.setattr(command, "measure_bandwidth", lambda threads, repeats=3: bandwidth(threads, 8, repeats))
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    rc = bench_main(["--model", str(inputs / "model"), "--engine-dir", str(inputs / "engine"), "--runs", "1",
                     "--warmup", "0", "--max-new-tokens", "3", "--threads", "1", "--json", str(out_json),
                     "--plot", str(out_png)])
    assert rc == 0
    report = json.loads(out_json.read_text())
    assert {"pytorch", "runtime", "speedup", "machine", "roofline"} <= set(report)
    for side in ("pytorch", "runtime"):
        assert SIDE_KEYS <= set(report[side])
        assert all(report[side][k] > 0 for k in SIDE_KEYS)
    assert set(report["speedup"]) >= {"ttft", "decode"} and report["speedup"]["decode"] > 0
    roof = report["roofline"]
    assert roof["bandwidth_gbs"] > 0 and roof["bandwidth"]["probes"] == 2
    assert roof["breakdown"]["experts_active"] < roof["breakdown"]["experts_total"]
    assert set(roof["pct_of_roofline"]) == {"pytorch", "runtime"}
    assert report["machine"]["threads"] == 1 and report["settings"]["decode_steps"] == 2
    assert report["settings"]["device"] == "cpu" and report["runtime_backend"] == "onnxruntime"
    assert out_png.read_bytes().startswith(PNG)
    table = capsys.readouterr().out
    assert "% of decode roofline" in table and "decode weight GB/s" in table and "peak RSS MB" in table


def fake_scaling() -> dict:
    def side(d: float, p: float) -> dict:
        return {"decode_ms_per_token": d, "decode_tok_s": 1e3 / d, "prefill_ms": p, "ttft_ms": p + 1,
                "peak_rss_mb": 100.0, "spread": {}}
    points = [{"experts": e, "params_total": 10e6 * e, "params_active": 20e6, "weight_bytes_per_token": 8e7,
               "pytorch": side(10.0 + e / 8, 50.0), "runtime": side(2.0 + e / 100, 10.0)} for e in (4, 8, 16)]
    return {"preset": "tiny", "top_k": 2, "runs": 1, "warmup": 0, "threads": 1, "decode_steps": 2, "prompt_tokens": 9,
            "points": points, "ratios": {"experts": [4, 16], "params_total": 4.0,
                                         "pytorch": {"decode": 12 / 10.5, "prefill": 1.0},
                                         "runtime": {"decode": 2.16 / 2.04, "prefill": 1.0}}}


def test_scaling_plot_and_table(tmp_path):
    path = plot_scaling(fake_scaling(), tmp_path / "scaling.png")
    assert path.read_bytes().startswith(PNG)
    assert "ratio E16/E4" in scaling_table(fake_scaling())


@pytest.mark.parametrize("argv, message", [
    (["--runs", "0"], "--runs must be at least 1"),
    (["--max-new-tokens", "1"], "--max-new-tokens must be at least 2"),
    ([], None),
])
def test_bad_arguments_are_one_line_errors(inputs, argv, message, capsys):
    model = [] if message is None else ["--model", str(inputs / "model")]
    assert bench_main(model + argv) == 2
    assert (message or "give --model") in capsys.readouterr().err


def test_device_cuda_without_a_gpu_is_one_line(inputs, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    assert bench_main(["--model", str(inputs / "model"), "--engine-dir", str(inputs / "engine"),
                       "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --device cuda: torch") and err.count("\n") == 1


def test_unknown_backend_is_rejected_by_the_parser():
    with pytest.raises(SystemExit):
        command.build_parser().parse_args(["--model", "x", "--backends", "pytorch,tensorrtx"])


def test_precisions_table_reads_export_dirs(inputs, tmp_path, capsys):
    with pytest.raises(SystemExit):  # not an export directory: the parser says so
        command.build_parser().parse_args(["--precisions", str(tmp_path)])
    out = tmp_path / "precisions.json"
    assert bench_main(["--precisions", str(inputs / "engine"), "--threads", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["precisions"]
    assert len(rows) == 1 and rows[0]["precision"] == "fp32" and rows[0]["size_ratio"] == 1.0
    assert rows[0]["size_mb"] > 0 and rows[0]["decode_tokens_per_s"] > 0
    assert "| fp32 |" in capsys.readouterr().out


def test_quantised_export_has_no_runtime_roofline_and_the_table_says_so(inputs, tmp_path, capsys):
    """int8/int4 exports have no simple weight byte count: the report leaves them out of the roofline and the
    table prints "-" for them (it raised KeyError at the released size)."""
    import shutil
    engine = tmp_path / "engine"
    shutil.copytree(inputs / "engine", engine)
    manifest = json.loads((engine / "manifest.json").read_text())
    manifest["precision"] = "int4"
    (engine / "manifest.json").write_text(json.dumps(manifest))
    rc = bench_main(["--model", str(inputs / "model"), "--engine-dir", str(engine), "--runs", "1", "--warmup", "0",
                     "--max-new-tokens", "2", "--threads", "1", "--json", str(tmp_path / "b.json")])
    assert rc == 0
    assert set(json.loads((tmp_path / "b.json").read_text())["roofline"]["pct_of_roofline"]) == {"pytorch"}
    out = capsys.readouterr().out.splitlines()
    roofline_row = next(line for line in out if line.startswith("% of decode"))
    cells = roofline_row.split("ceiling")[0].split()[4:]           # after "% of decode roofline"
    assert cells[0].endswith("%") and cells[1] == "-"                # pytorch figured, the int4 runtime not
    # the weight breakdown is fp32's (it said "at int4" over fp32 byte counts)
    assert next(line for line in out if line.startswith("weights read per decode token")).endswith("at fp32")
