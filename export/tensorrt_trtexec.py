"""The trtexec command line equivalent to one engine build (printed for users; pure logic).

trtexec spells one profile as --minShapes/--optShapes/--maxShapes (name:AxBxC, comma separated); several
profiles each start with --profile=i. --dynamicPlugins loads a library through getCreators (how the builder and
runtime load libmoe_llava_plugin.so); --staticPlugins is for a library built with MOE_LLAVA_STATIC_REGISTRATION.
--stronglyTyped keeps the graph's precision (the default, and a no-op flag, in TensorRT 11).
"""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import Sequence

from .tensorrt_profiles import Profile

SELECTORS = ("min", "opt", "max")


def shape_spec(profile: Profile, selector: str) -> str:
    """'name:1x3x336x336,other:...' for one selector; zero-length axes print as 0 (e.g. an empty past)."""
    return ",".join(f"{name}:{'x'.join(str(d) for d in getattr(r, selector))}"
                    for name, r in profile.shapes.items())


def trtexec_command(onnx: Path, engine: Path, profiles: Sequence[Profile], plugin: Path | None = None,
                    workspace_mb: int | None = None, timing_cache: Path | None = None,
                    static_plugin: bool = False) -> list[str]:
    argv = ["trtexec", f"--onnx={onnx}", f"--saveEngine={engine}", "--stronglyTyped", "--skipInference"]
    if plugin is not None:
        argv.append(f"--{'staticPlugins' if static_plugin else 'dynamicPlugins'}={plugin}")
    for index, profile in enumerate(profiles):
        if len(profiles) > 1:
            argv.append(f"--profile={index}")
        argv += [f"--{selector}Shapes={shape_spec(profile, selector)}" for selector in SELECTORS]
    if workspace_mb:
        argv.append(f"--memPoolSize=workspace:{workspace_mb}M")
    if timing_cache is not None:
        argv.append(f"--timingCacheFile={timing_cache}")
    return argv


def format_command(argv: Sequence[str]) -> str:
    return " ".join(shlex.quote(str(a)) for a in argv)
