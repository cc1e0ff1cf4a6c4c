"""Step `kernels`: the plugin kernel sweep, every tests/plugins/test_*_gpu.py against PyTorch (pytest)."""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET

from gpu_check.common import BUILD_DIR, PLUGIN_TESTS, REPO, StepFailed, run_logged

TIMEOUT_S = 280  # 178 tests took 41 s on an H100 including the extension build


def junit_counts(path) -> dict:
    """tests / failures / errors / skipped / passed from a pytest junit-xml file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def skip_reasons(path) -> list[str]:
    reasons = {el.get("message", "") for el in ET.parse(path).getroot().iter("skipped")}
    return sorted(r for r in reasons if r)


def run() -> tuple[str, dict]:
    files = sorted(PLUGIN_TESTS.glob("test_*_gpu.py"))
    if not files:
        raise StepFailed(f"no test_*_gpu.py under {PLUGIN_TESTS}")
    junit = BUILD_DIR / "kernels-junit.xml"
    junit.parent.mkdir(parents=True, exist_ok=True)
    junit.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", f"--junitxml={junit}",
           *[f.relative_to(REPO) for f in files]]
    res = run_logged(cmd, TIMEOUT_S)
    if not junit.is_file():
        raise StepFailed(f"pytest wrote no results (exit status {res.returncode})")
    figures = {"files": [f.name for f in files], **junit_counts(junit), "skip_reasons": skip_reasons(junit)}
    summary = (f"{figures['passed']} passed, {figures['failures'] + figures['errors']} failed, "
               f"{figures['skipped']} skipped in {len(files)} files")
    if res.returncode != 0 or figures["failures"] or figures["errors"]:
        raise StepFailed(summary, figures)
    if figures["passed"] == 0:
        raise StepFailed(f"{summary}: nothing ran on the GPU", figures)
    return summary, figures
