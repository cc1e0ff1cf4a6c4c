"""Packages import only downward: runtime <- moe_llava <- export <- calibration <- benchmarks <- cli
(cli.py and commands/, the console scripts' modules).

Read from the source with `ast`, so lazy imports inside functions count as much as top-level ones (a lazy
import is still a dependency; it only moves the failure to run time). runtime/ additionally never imports
torch or transformers (the Jetson rule; tests/runtime/test_runtime_imports.py checks it by importing)."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("runtime", "moe_llava", "export", "calibration", "benchmarks", "cli")
RUNTIME_FORBIDDEN = ("torch", "transformers")


def project_files() -> list[Path]:
    files = [REPO / "cli.py"]
    for package in LAYERS[:-1] + ("commands",):
        files += sorted((REPO / package).rglob("*.py"))
    return files


def layer_of(path: Path) -> str:
    top = path.relative_to(REPO).parts[0].removesuffix(".py")
    return "cli" if top == "commands" else top


def imported_modules(source: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the source, at any depth."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def violations(source: str, layer: str, label: str) -> list[str]:
    rank = LAYERS.index(layer)
    bad = []
    for line, module in imported_modules(source):
        top = module.split(".")[0]
        top = "cli" if top == "commands" else top
        upward = top in LAYERS and LAYERS.index(top) > rank
        heavy = layer == "runtime" and top in RUNTIME_FORBIDDEN
        if upward or heavy:
            bad.append(f"{label}:{line}: {layer} imports {module}")
    return bad


def test_every_import_points_down_the_layers():
    files = project_files()
    assert len(files) > 60 and REPO / "benchmarks" / "command.py" in files
    bad = [v for f in files for v in violations(f.read_text(), layer_of(f), str(f.relative_to(REPO)))]
    assert not bad, "imports against the layer order " + " <- ".join(LAYERS) + ":\n" + "\n".join(bad)


def test_the_checker_sees_lazy_imports():
    """A function-level upward import is caught (the checker itself could silently see nothing)."""
    source = "import numpy\n\ndef f():\n    from calibration.quantize import export_quantized\n"
    assert violations(source, "export", "export/x.py") == ["export/x.py:4: export imports calibration.quantize"]
    assert violations("import torch\n", "runtime", "runtime/x.py") == ["runtime/x.py:1: runtime imports torch"]
