"""What every gpu-check step shares: paths, the failure exception, logged subprocesses, tool lookup."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PLUGIN_DIR = REPO / "runtime" / "plugins"
PLUGIN_TESTS = REPO / "tests" / "plugins"
BUILD_DIR = REPO / "build" / "gpu-check"  # git-ignored; reused between steps and runs
TORCH_EXTENSIONS_DIR = BUILD_DIR / "torch_extensions"  # one build of the kernel extension for tests and timing


class StepFailed(Exception):
    """A check did not hold: `summary` is the one-line reason, `figures` what was measured up to then."""

    def __init__(self, summary: str, figures: dict | None = None):
        super().__init__(summary)
        self.summary, self.figures = summary, figures or {}


def step_env() -> dict[str, str]:
    """The environment for every subprocess: the repo importable, one torch extension cache, all cores."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(TORCH_EXTENSIONS_DIR))
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    return env


def run_logged(cmd: list[str], timeout: float, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Runs `cmd`, echoing the command and its merged output to stdout (the orchestrator keeps it in the report).
    A timeout becomes StepFailed."""
    print("$ " + " ".join(map(str, cmd)), flush=True)
    try:
        res = subprocess.run([str(c) for c in cmd], cwd=cwd, env=step_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, errors="replace", timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        print(out, flush=True)
        raise StepFailed(f"{Path(str(cmd[0])).name} timed out after {timeout:.0f} s") from None
    print(res.stdout, flush=True)
    print(f"(exit status {res.returncode})", flush=True)
    return res


def cuda_tool(name: str) -> str | None:
    """nvcc / compute-sanitizer: on PATH, else under $CUDA_HOME or /usr/local/cuda."""
    found = shutil.which(name)
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / name).is_file():
            return str(Path(root) / "bin" / name)
    return None


def import_plugin_reference():
    """tests/plugins/plugin_reference.py: the NumPy reference of the plugin node and its random inputs."""
    if str(PLUGIN_TESTS) not in sys.path:
        sys.path.insert(0, str(PLUGIN_TESTS))
    import plugin_reference

    return plugin_reference
