"""Console entry points: each wires one command module (`build_parser()` + `main(args)`) to its script.

Bad input raises `UserError` anywhere below; it is printed as one line, exit code 2, no traceback
(runtime.errors.run_command).
"""
from __future__ import annotations

import importlib
import sys

from runtime.errors import run_command

COMMANDS = {"moe-run": "commands.run", "moe-export": "commands.export", "moe-bench": "benchmarks.command",
            "moe-train": "moe_llava.train.command", "moe-eval": "moe_llava.train.eval_command",
            "moe-serve": "commands.serve"}


def _entry(script: str, argv) -> int:
    module = importlib.import_module(COMMANDS[script])  # lazily: moe-run --engine-dir must not import torch
    return run_command(module.main, module.build_parser(), argv)


def run_main(argv=None) -> int:
    return _entry("moe-run", argv)


def export_main(argv=None) -> int:
    return _entry("moe-export", argv)


def bench_main(argv=None) -> int:
    return _entry("moe-bench", argv)


def train_main(argv=None) -> int:
    return _entry("moe-train", argv)


def eval_main(argv=None) -> int:
    return _entry("moe-eval", argv)


def serve_main(argv=None) -> int:
    return _entry("moe-serve", argv)


if __name__ == "__main__":
    sys.exit(run_main())
