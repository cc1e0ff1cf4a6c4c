"""Runs one step in this process and writes its outcome as JSON:

    python -m gpu_check.worker NAME MODULE:FUNCTION RESULT.json

Kept apart from the orchestrator so a crash, a hang or a CUDA error that poisons the context costs one step only.
"""

from __future__ import annotations

import importlib
import json
import sys
import traceback

from gpu_check.common import StepFailed


def main(argv: list[str]) -> int:
    name, target, result_path = argv
    try:
        module, function = target.split(":")
        summary, figures = getattr(importlib.import_module(module), function)()
        outcome = {"status": "pass", "summary": summary, "figures": figures}
    except StepFailed as exc:
        outcome = {"status": "fail", "summary": exc.summary, "figures": exc.figures}
    except Exception as exc:  # a bug or an environment problem: the traceback goes into the step's log
        traceback.print_exc()
        outcome = {"status": "fail", "summary": f"crashed: {type(exc).__name__}: {exc}"[:500], "figures": {}}
    with open(result_path, "w") as f:
        json.dump(outcome, f, default=str)
    print(f"[{name}] {outcome['status'].upper()}: {outcome['summary']}", flush=True)
    return 0 if outcome["status"] == "pass" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
