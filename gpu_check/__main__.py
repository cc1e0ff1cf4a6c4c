"""make gpu-check: the GPU verification run (rung 2), one report.

    python3 -m gpu_check [--out DIR] [--only kernels,lifecycle,...] [--budget-s 420] [--list]

Without an NVIDIA GPU it says so in one line and exits 0. With one it runs every step (or those named by --only)
in its own subprocess under a time limit, writes DIR/<date>-<device>.md and .json (device, versions, each step's
result, duration, figures and captured output) and exits 1 if any step failed. The lifecycle steps need
NVIDIA/TensorRT's open-source include/ (v10.3.0) in .trt-headers/include (git-ignored) or $TENSORRT_INCLUDE_DIR.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpu_check import environment
from gpu_check.common import REPO, step_env
from gpu_check.report import Status, StepResult, write_report
from gpu_check.steps import BY_NAME, STEPS, Step


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "gpu-check", help="report folder")
    ap.add_argument("--only", default="", help="comma-separated steps to run (default: all); see --list")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="wall-clock budget for all steps; a step gets at most what is left")
    ap.add_argument("--list", action="store_true", help="list the steps and exit")
    return ap.parse_args(argv)


def select_steps(only: str) -> list[Step]:
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        sys.stderr.write(f"gpu_check: unknown step {', '.join(unknown)}; choose from {', '.join(BY_NAME)}\n")
        sys.exit(2)
    return [s for s in STEPS if not names or s.name in names]


def run_step(step: Step, time_left: float) -> StepResult:
    """The step in a worker subprocess, its output captured; a timeout or a crash is a failed step."""
    limit = min(step.timeout_s, time_left)
    if time_left < 5:
        return StepResult(step.name, Status.FAIL, 0.0, "not run: the --budget-s was used up by earlier steps")
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "gpu_check.worker", step.name, step.target, str(result_file)]
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=step_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, errors="replace", timeout=limit)
            log = proc.stdout
        except subprocess.TimeoutExpired as exc:
            log = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            return StepResult(step.name, Status.FAIL, time.monotonic() - start,
                              f"timed out after {limit:.0f} s", log=log)
        seconds = time.monotonic() - start
        if not result_file.is_file():
            return StepResult(step.name, Status.FAIL, seconds,
                              f"worker died (exit status {proc.returncode}) without a result", log=log)
        outcome = json.loads(result_file.read_text())
    return StepResult(step.name, Status(outcome["status"]), seconds, outcome["summary"], outcome["figures"], log)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for s in STEPS:
            print(f"{s.name:14} {s.what} (limit {s.timeout_s:.0f} s)")
        return 0
    steps = select_steps(args.only)
    gpus = environment.gpu_names()
    if not gpus:
        print("gpu-check: no NVIDIA GPU here (nvidia-smi lists none); nothing checked - run it on a GPU machine")
        return 0
    env = environment.collect()
    print(f"gpu-check on {env.get('device', gpus[0])}: {', '.join(s.name for s in steps)}", flush=True)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    command = ("python3 -m gpu_check " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    deadline, results = time.monotonic() + args.budget_s, []
    for step in steps:
        print(f"[{step.name}] {step.what} ...", flush=True)
        result = run_step(step, deadline - time.monotonic())
        print(f"[{step.name}] {result.status.value.upper()} in {result.seconds:.1f} s: {result.summary}", flush=True)
        results.append(result)
        paths = write_report(args.out, date, env, results, command)  # after every step: a killed run keeps its report
    for path in paths:
        print(f"report: {path}")
    failed = [r.name for r in results if r.status is Status.FAIL]
    print(f"gpu-check: {'FAILED: ' + ', '.join(failed) if failed else 'all steps passed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
