"""The `engines` section of manifest.json: what moe-export --target tensorrt built, and for which TensorRT and
GPU; checked before TensorRT sees a file, so a mismatch is one line that says to rebuild."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.errors import UserError
from runtime.manifest import MANIFEST_FILE, PARTS, Manifest

from .libraries import PLUGIN_ENV
from .memory import KVMode

ENGINES_KEY = "engines"  # the manifest section moe-export --target tensorrt writes
ENGINES_FORMAT = 1
PREFILL, DECODE = "prefill", "decode"  # the decoder's two optimisation profiles


@dataclass(frozen=True)
class EngineFile:
    file: str
    profiles: tuple[str, ...]  # profile names; TensorRT's profile index = position


@dataclass(frozen=True)
class EngineSet:
    """`engines` in manifest.json: what moe-export --target tensorrt built, and for which TensorRT and GPU."""
    root: Path
    tensorrt_version: str
    parts: dict[str, EngineFile]
    plugin: str | None = None  # file name inside root
    compute_capability: str | None = None  # "8.7"; None when the builder could not query the GPU
    gpu_name: str = ""
    max_batch: int = 1
    max_seq: int = 0
    kv_mode: KVMode = KVMode.CONCAT  # how the decoder engine's KV I/O sits in the device cache
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, manifest: Manifest) -> EngineSet:
        raw = json.loads((manifest.root / MANIFEST_FILE).read_text(encoding="utf-8"))
        if not raw.get(ENGINES_KEY):
            raise UserError(f"{manifest.root}: no TensorRT engines in this export directory; build them with "
                            f"moe-export --target tensorrt --from-onnx {manifest.root} --out DIR, "
                            "or run it with --backend onnxruntime")
        return cls.from_dict(manifest.root, raw[ENGINES_KEY])

    @classmethod
    def from_dict(cls, root: Path, d: dict[str, Any]) -> EngineSet:
        where = f"{Path(root) / MANIFEST_FILE}: {ENGINES_KEY}"
        if d.get("format") != ENGINES_FORMAT:
            raise UserError(f"{where}: format {d.get('format')!r} is not {ENGINES_FORMAT}; rebuild the engines")
        try:
            parts = {name: EngineFile(str(p["file"]), tuple(str(q["name"]) for q in p["profiles"]))
                     for name, p in d["parts"].items()}
            gpu = d.get("gpu") or {}
            engines = cls(Path(root), str(d["tensorrt_version"]), parts, d.get("plugin"),
                          gpu.get("compute_capability"), str(gpu.get("name") or ""), int(d.get("max_batch", 1)),
                          int(d.get("max_seq", 0)), KVMode(d.get("kv_mode", KVMode.CONCAT.value)),
                          {k: v for k, v in d.items() if k not in _ENGINE_KEYS})
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise UserError(f"{where}: malformed ({type(e).__name__}: {e})") from None
        missing = [p for p in PARTS if p not in parts]
        if missing:
            raise UserError(f"{where}: parts {missing} missing (expected {list(PARTS)}); rebuild the engines")
        if not {PREFILL, DECODE} <= set(parts["decoder"].profiles):
            raise UserError(f"{where}: the decoder needs profiles {PREFILL!r} and {DECODE!r}, "
                            f"has {list(parts['decoder'].profiles)}")
        return engines

    def path(self, part: str) -> Path:
        return self.root / self.parts[part].file

    def profile_index(self, part: str, name: str) -> int:
        return self.parts[part].profiles.index(name)

    def plugin_path(self, override: str | Path | None = None) -> Path | None:
        """--plugin / $MOE_LLAVA_PLUGIN first, else the copy the builder put next to the engines."""
        chosen = override or os.environ.get(PLUGIN_ENV)
        if chosen:
            return Path(chosen)
        return self.root / self.plugin if self.plugin else None

    def check_files(self, plugin: Path | None) -> None:
        missing = [f"{self.path(p).name} ({p})" for p in PARTS if not self.path(p).is_file()]
        if plugin is not None and not plugin.is_file():
            missing.append(f"{plugin} (the MoE plugin library)")
        if missing:
            raise UserError(f"{self.root}: missing {', '.join(missing)}; rebuild with moe-export --target tensorrt")

    def check_compatible(self, tensorrt_version: str, sm: tuple[int, int] | None, gpu_name: str = "") -> None:
        """Engines are tied to one TensorRT release and one GPU architecture: say so before TensorRT fails."""
        if _release(tensorrt_version) != _release(self.tensorrt_version):
            raise UserError(f"{self.root}: engines were built with TensorRT {self.tensorrt_version}, this is "
                            f"{tensorrt_version}; rebuild them here (moe-export --target tensorrt --from-onnx)")
        if sm is not None and self.compute_capability and self.compute_capability != f"{sm[0]}.{sm[1]}":
            raise UserError(f"{self.root}: engines were built for SM {self.compute_capability} "
                            f"({self.gpu_name or 'another GPU'}), this GPU {gpu_name} is SM {sm[0]}.{sm[1]}; "
                            "rebuild them on this device")


_ENGINE_KEYS = ("format", "tensorrt_version", "parts", "plugin", "gpu", "max_batch", "max_seq", "kv_mode")


def _release(version: str) -> tuple[str, ...]:
    return tuple(str(version).split(".")[:3])
