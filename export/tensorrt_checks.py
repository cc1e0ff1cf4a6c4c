"""Checks before a TensorRT build: target GPU, precision, MoE lowering, TensorRT version. Pure logic.

Everything here runs before any work is done, so a build that cannot succeed fails in a second with one line
instead of after an ONNX export and half an engine build.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from runtime.errors import UserError

SM = tuple[int, int]  # compute capability (major, minor)
FP8_MIN_SM: SM = (8, 9)  # Ada; Hopper, Blackwell and Thor have FP8 too, Orin (8.7) and Ampere do not
MIN_TENSORRT_MAJOR = 10  # the MoE plugin is an IPluginV3; JetPack 5's TensorRT 8.5 cannot load it


@dataclass(frozen=True)
class GpuFamily:
    name: str
    sms: tuple[SM, ...]
    description: str


FAMILIES = {f.name: f for f in (
    GpuFamily("orin", ((8, 7),), "Jetson Orin (SM 8.7)"),
    GpuFamily("thor", ((11, 0), (10, 1)), "Jetson Thor (SM 11.0; 10.1 in CUDA 12.8/12.9 numbering)"),
    GpuFamily("ampere", ((8, 0), (8, 6)), "Ampere (SM 8.0 / 8.6)"),
    GpuFamily("ada", ((8, 9),), "Ada (SM 8.9)"),
    GpuFamily("hopper", ((9, 0),), "Hopper (SM 9.0)"),
    GpuFamily("blackwell", ((10, 0), (10, 3), (12, 0), (12, 1)), "Blackwell (SM 10.x / 12.x)"),
)}


@dataclass(frozen=True)
class GpuTarget:
    """The GPU the engines are built for (= the one they are built on). Either part may be unknown."""
    family: str | None
    sm: SM | None
    name: str = ""
    measured: bool = False  # sm queried from this machine's GPU, not assumed from the family

    def describe(self) -> str:
        label = FAMILIES[self.family].description if self.family else (self.name or "unknown GPU")
        return label if self.sm is None else f"{label}, this device SM {self.sm[0]}.{self.sm[1]}"


def family_of(sm: SM) -> str | None:
    return next((f.name for f in FAMILIES.values() if sm in f.sms), None)


def resolve_gpu(requested: str, detected: SM | None, detected_name: str = "") -> GpuTarget:
    """--gpu auto|orin|thor|... against the GPU found on this machine (None when it cannot be queried)."""
    requested = (requested or "auto").lower()
    if requested == "auto":
        return GpuTarget(family_of(detected) if detected else None, detected, detected_name, detected is not None)
    if requested not in FAMILIES:
        raise UserError(f"--gpu {requested!r}: expected auto or one of {sorted(FAMILIES)}")
    family = FAMILIES[requested]
    if detected is not None and detected not in family.sms:
        raise UserError(f"--gpu {requested} ({family.description}) but this machine's GPU is "
                        f"{detected_name or 'a GPU'} SM {detected[0]}.{detected[1]}: TensorRT engines run only on "
                        f"the GPU they are built on - copy the ONNX export to the target and run "
                        f"moe-export --target tensorrt --from-onnx DIR there")
    return GpuTarget(family.name, detected or family.sms[0], detected_name, detected is not None)


def check_precision(precision: str, gpu: GpuTarget) -> None:
    """FP8 needs SM 8.9+: refuse it for Orin (SM 8.7) and Ampere with a way out."""
    if precision != "fp8" or gpu.sm is None or gpu.sm >= FP8_MIN_SM:
        return
    raise UserError(f"--precision fp8 needs FP8 tensor cores (SM 8.9+: Ada, Hopper, Blackwell, Thor); "
                    f"{gpu.describe()} has none - Jetson Orin supports fp16, int8 and int4: use one of those")


def check_moe_impl(impl: str) -> None:
    """TensorRT parses the plugin node or standard ops, not onnxruntime's contrib MoE op."""
    if impl == "ort":
        raise UserError("--moe-impl ort emits com.microsoft.MoE, an onnxruntime contrib op the TensorRT ONNX "
                        "parser cannot import; use --moe-impl plugin (the default for --target tensorrt) or portable")


def check_tensorrt_version(version: str) -> None:
    major = parse_version(version)[0]
    if major < MIN_TENSORRT_MAJOR:
        raise UserError(f"TensorRT {version} is too old: the MoE plugin is an IPluginV3, which needs TensorRT "
                        f">= {MIN_TENSORRT_MAJOR} (JetPack 6 ships 10.3); upgrade, or use --target onnx")


def parse_version(version: str) -> tuple[int, ...]:
    """'10.16.0rc1' -> (10, 16, 0): the leading digits of the first three components."""
    parts = []
    for piece in str(version).split(".")[:3]:
        digits = re.match(r"\d*", piece).group()
        parts.append(int(digits) if digits else 0)
    return tuple(parts + [0] * (3 - len(parts)))
