"""make gpu-check without a GPU: the no-GPU line, the orchestration (fake steps in worker subprocesses), the report
files and the lifecycle step's output comparison. The real steps need a GPU and run only under `make gpu-check`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

import gpu_check.__main__ as cli
from gpu_check import lifecycle
from gpu_check.common import REPO, StepFailed
from gpu_check.report import Status, StepResult, report_stem, write_report
from gpu_check.steps import Step

FAKE_STEPS = textwrap.dedent("""
    import time
    from gpu_check.common import StepFailed

    def passing():
        print("measured something")
        return "all good", {"ms": 1.5}

    def failing():
        print("the tail that explains it")
        raise StepFailed("a check did not hold", {"max_err": 0.5})

    def crashing():
        raise KeyError("boom")

    def hanging():
        time.sleep(60)
""")


def test_without_a_gpu_one_line_and_exit_0(tmp_path):
    env = {**os.environ, "PATH": str(tmp_path), "PYTHONPATH": str(REPO)}  # no nvidia-smi on PATH
    res = subprocess.run([sys.executable, "-m", "gpu_check", "--out", str(tmp_path / "out")], env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("\n") == 1 and "no NVIDIA GPU" in res.stdout
    assert not (tmp_path / "out").exists()


def test_unknown_step_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--only", "kernels,nope"])
    assert exc.value.code == 2
    assert "unknown step nope" in capsys.readouterr().err


@pytest.fixture
def fake_machine(tmp_path, monkeypatch):
    """A 'GPU' and four fake steps whose module the worker subprocesses import from tmp_path."""
    (tmp_path / "fake_steps.py").write_text(FAKE_STEPS)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setattr(cli.environment, "gpu_names", lambda: ["Fake GPU 80GB"])
    monkeypatch.setattr(cli.environment, "collect", lambda: {"device": "Fake GPU 80GB", "driver": "1.0"})
    steps = [Step("good", "fake_steps:passing", 60, "passes"), Step("bad", "fake_steps:failing", 60, "fails"),
             Step("crash", "fake_steps:crashing", 60, "crashes"), Step("hang", "fake_steps:hanging", 3, "hangs")]
    monkeypatch.setattr(cli, "STEPS", steps)
    monkeypatch.setattr(cli, "BY_NAME", {s.name: s for s in steps})
    return tmp_path


def read_report(out_dir):
    (json_file,) = out_dir.glob("*-fake-gpu-80gb.json")
    return json.loads(json_file.read_text()), json_file.with_suffix(".md").read_text()


def test_every_outcome_lands_in_the_report(fake_machine):
    out = fake_machine / "report"
    assert cli.main(["--out", str(out)]) == 1
    doc, md = read_report(out)
    steps = {s["name"]: s for s in doc["steps"]}
    assert [s["status"] for s in doc["steps"]] == ["pass", "fail", "fail", "fail"] and doc["passed"] is False
    assert steps["good"]["figures"] == {"ms": 1.5} and "measured something" in steps["good"]["log"]
    assert steps["bad"]["summary"] == "a check did not hold" and steps["bad"]["figures"] == {"max_err": 0.5}
    assert "KeyError" in steps["crash"]["summary"] and "Traceback" in steps["crash"]["log"]
    assert steps["hang"]["summary"] == "timed out after 3 s" and steps["hang"]["seconds"] < 30
    assert doc["environment"]["driver"] == "1.0"
    assert "the tail that explains it" in md and "| bad | FAIL |" in md and "PASSED" not in md.splitlines()[0]


def test_only_runs_the_named_steps_and_passes(fake_machine):
    out = fake_machine / "report"
    assert cli.main(["--out", str(out), "--only", "good"]) == 0
    doc, md = read_report(out)
    assert [s["name"] for s in doc["steps"]] == ["good"] and doc["passed"] is True
    assert md.splitlines()[0].endswith("PASSED")


def test_budget_exhausted_steps_fail_unrun(fake_machine):
    assert cli.main(["--out", str(fake_machine / "r"), "--only", "good,bad", "--budget-s", "1"]) == 1
    doc, _ = read_report(fake_machine / "r")
    assert all("not run" in s["summary"] for s in doc["steps"])


def test_report_files_are_named_by_date_and_device(tmp_path):
    steps = [StepResult("kernels", Status.PASS, 40.7, "178 passed", {"passed": 178}, log="x" * 50_000)]
    paths = write_report(tmp_path, "2026-11-27", {"device": "NVIDIA H100 80GB HBM3"}, steps, "python3 -m gpu_check")
    assert [p.name for p in paths] == ["2026-11-27-nvidia-h100-80gb-hbm3.md", "2026-11-27-nvidia-h100-80gb-hbm3.json"]
    doc = json.loads(paths[1].read_text())
    assert doc["passed"] is True and len(doc["steps"][0]["log"]) == 20_000  # the tail is kept, bounded
    assert report_stem("2026-01-02", "Orin (nvgpu)") == "2026-01-02-orin-nvgpu"


def write_driver_outputs(case, work, outputs):
    for name, arr in outputs.items():
        arr.astype(case.dtype).tofile(work / f"out_{name}.bin")


def test_lifecycle_outputs_are_checked_against_the_reference(tmp_path):
    case = lifecycle.Case(T=5, dtype="float16", H=64, I=32)
    moe = lifecycle.write_inputs(case, tmp_path)
    expected = lifecycle.import_plugin_reference().reference_moe(moe)[0]
    write_driver_outputs(case, tmp_path, {n: expected for n in lifecycle.OUTPUTS})
    figures = lifecycle.check_outputs(case, moe, tmp_path)
    assert figures["graph_bitwise_equal_eager"] and figures["misaligned_max_abs_diff_vs_aligned"] == 0.0

    wrong = expected.copy()
    wrong[2, 7] += 0.5  # one element off by far more than fp16 rounding
    write_driver_outputs(case, tmp_path, {"misaligned": wrong})
    with pytest.raises(StepFailed, match="T5-fp16 misaligned output differs"):
        lifecycle.check_outputs(case, moe, tmp_path)
    (tmp_path / "out_graph.bin").unlink()
    with pytest.raises(StepFailed, match="no out_graph.bin"):
        lifecycle.check_outputs(case, moe, tmp_path)


def test_kernel_sweep_counts_come_from_junit(tmp_path):
    from gpu_check.kernels import junit_counts, skip_reasons

    (tmp_path / "j.xml").write_text(
        '<testsuites><testsuite tests="5" failures="1" errors="0" skipped="1">'
        '<testcase name="a"><skipped message="no CUDA GPU"/></testcase></testsuite></testsuites>')
    assert junit_counts(tmp_path / "j.xml") == {"tests": 5, "failures": 1, "errors": 0, "skipped": 1, "passed": 3}
    assert skip_reasons(tmp_path / "j.xml") == ["no CUDA GPU"]


def test_every_real_step_names_an_importable_function():
    """A typo in a step's target would only show on the GPU machine; importing costs nothing here."""
    import importlib

    from gpu_check.steps import STEPS
    for step in STEPS:
        module, function = step.target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), step.target
    assert len({s.name for s in STEPS}) == len(STEPS)
