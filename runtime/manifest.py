"""manifest.json of an export directory: typed, validated on load, one-line UserError on anything wrong.

The directory contract (written by export/, read here):
  manifest.json, vision.onnx, projector.onnx, embed.onnx, decoder.onnx (each may have a .data file),
  tokenizer.json, validation.json.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import UserError
from runtime.preprocess import ImageSpec
from runtime.prompt import IMAGE_TOKEN_INDEX, Template

MANIFEST_FILE = "manifest.json"
SUPPORTED_FORMAT_VERSIONS = (1,)
PARTS = ("vision", "projector", "embed", "decoder")
# attention a decoder graph carries: "unfused" = standard ops, present = concat(past, new); "fused" =
# com.microsoft.GroupQueryAttention, past and present may share one buffer of max_positions (written in place)
ATTENTIONS = ("unfused", "fused")
# how the decoder stores its KV cache: "float" = the graph's float dtype; "int8" = GroupQueryAttention's quantised
# cache (fused attention only; per-channel scales inside the graph, export/kv_cache_int8.py)
KV_CACHES = ("float", "int8")
DTYPES = ("float32", "float16", "int64", "int32", "int8", "uint8", "bool")
REQUIRED_KEYS = ("format_version", "model_type", "config", "precision", "moe_impl", "template", "tokenizer",
                 "special_tokens", "image", "decoder", "parts")
# Fixed I/O names of the parts (decoder past/present names depend on num_layers: see DecoderSpec).
PART_IO = {
    "vision": (("pixel_values",), ("image_features",)),
    "projector": (("image_features",), ("image_embeds",)),
    "embed": (("input_ids",), ("inputs_embeds",)),
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str, ...]  # ints, or strings naming dynamic axes
    dtype: str  # numpy name

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        if d.get("dtype") not in DTYPES:
            raise ValueError(f"tensor {d.get('name')!r}: dtype {d.get('dtype')!r} not one of {DTYPES}")
        return cls(str(d["name"]), tuple(d["shape"]), d["dtype"])


@dataclass(frozen=True)
class PartSpec:
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def output(self, name: str) -> TensorSpec:
        return next(t for t in self.outputs if t.name == name)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PartSpec:
        return cls(str(d["file"]), tuple(map(TensorSpec.from_dict, d["inputs"])),
                   tuple(map(TensorSpec.from_dict, d["outputs"])))


@dataclass(frozen=True)
class DecoderSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_positions: int

    def io_names(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(inputs, outputs) of decoder.onnx as the contract names them."""
        layers = range(self.num_layers)
        past = tuple(f"past_key_values.{i}.{kv}" for i in layers for kv in ("key", "value"))
        present = tuple(f"present.{i}.{kv}" for i in layers for kv in ("key", "value"))
        return ("inputs_embeds", "attention_mask", "position_ids") + past, ("logits",) + present


@dataclass(frozen=True)
class SpecialTokens:
    bos_token_id: int | None
    eos_token_id: int
    pad_token_id: int | None = None
    image_token_index: int = IMAGE_TOKEN_INDEX


@dataclass(frozen=True)
class Manifest:
    root: Path
    format_version: int
    model_type: str
    config: dict[str, Any]
    precision: str
    moe_impl: str
    template: Template
    tokenizer: str
    special_tokens: SpecialTokens
    image: ImageSpec
    decoder: DecoderSpec
    parts: dict[str, PartSpec]
    source: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)
    attention: str = "unfused"  # exports written before the field existed carry unfused attention
    kv_cache: str = "float"     # likewise: a float cache

    def path(self, part: str) -> Path:
        return self.root / self.parts[part].file

    @property
    def tokenizer_path(self) -> Path:
        return self.root / self.tokenizer

    @classmethod
    def load(cls, engine_dir: str | Path) -> Manifest:
        root = Path(engine_dir)
        raw = _read_json(root / MANIFEST_FILE)
        manifest = _parse(root, raw)
        _check_files(manifest)
        _check_io(manifest)
        return manifest

    def to_dict(self) -> dict[str, Any]:
        def tensors(ts):
            return [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in ts]
        return {
            "format_version": self.format_version, "model_type": self.model_type, "config": self.config,
            "precision": self.precision, "moe_impl": self.moe_impl, "attention": self.attention,
            "kv_cache": self.kv_cache, "template": self.template.value,
            "tokenizer": self.tokenizer, "special_tokens": vars(self.special_tokens).copy(),
            "image": self.image.to_dict(), "decoder": vars(self.decoder).copy(),
            "parts": {k: {"file": p.file, "inputs": tensors(p.inputs), "outputs": tensors(p.outputs)}
                      for k, p in self.parts.items()},
            "source": self.source, "versions": self.versions,
        }


def _read_json(path: Path) -> dict[str, Any]:
    if not path.parent.is_dir():
        raise UserError(f"engine directory {str(path.parent)!r} does not exist; create it with moe-export")
    if not path.is_file():
        raise UserError(f"{path}: not found - is {str(path.parent)!r} an export directory (moe-export --out)?")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a JSON object at the top level")
    return raw


def _parse(root: Path, raw: dict[str, Any]) -> Manifest:
    where = root / MANIFEST_FILE
    missing = [k for k in REQUIRED_KEYS if k not in raw]
    if missing:
        raise UserError(f"{where}: missing keys {missing}")
    if raw["format_version"] not in SUPPORTED_FORMAT_VERSIONS:
        raise UserError(f"{where}: format_version {raw['format_version']!r} is not supported by this runtime "
                        f"(supported: {list(SUPPORTED_FORMAT_VERSIONS)}); re-export or upgrade the runtime")
    missing_parts = [p for p in PARTS if p not in raw["parts"]]
    if missing_parts:
        raise UserError(f"{where}: parts {missing_parts} missing (expected {list(PARTS)})")
    if raw.get("attention", "unfused") not in ATTENTIONS:
        raise UserError(f"{where}: attention {raw['attention']!r} is not one of {list(ATTENTIONS)}; "
                        "re-export or upgrade the runtime")
    if raw.get("kv_cache", "float") not in KV_CACHES:
        raise UserError(f"{where}: kv_cache {raw['kv_cache']!r} is not one of {list(KV_CACHES)}; "
                        "re-export or upgrade the runtime")
    if raw.get("kv_cache", "float") == "int8" and raw.get("attention") != "fused":
        raise UserError(f"{where}: an int8 KV cache needs fused attention (attention is "
                        f"{raw.get('attention', 'unfused')!r}); re-export with --attention fused")
    templates = [t.value for t in Template]
    if raw["template"] not in templates:
        raise UserError(f"{where}: template {raw['template']!r} is not one of {templates}")
    try:
        manifest = Manifest(
            root=root, format_version=raw["format_version"], model_type=str(raw["model_type"]),
            config=dict(raw["config"]), precision=str(raw["precision"]), moe_impl=str(raw["moe_impl"]),
            template=Template(raw["template"]), tokenizer=str(raw["tokenizer"]),
            special_tokens=SpecialTokens(**raw["special_tokens"]), image=ImageSpec.from_dict(raw["image"]),
            decoder=DecoderSpec(**raw["decoder"]),
            parts={name: PartSpec.from_dict(raw["parts"][name]) for name in PARTS},
            source=dict(raw.get("source", {})), versions=dict(raw.get("versions", {})),
            attention=str(raw.get("attention", "unfused")), kv_cache=str(raw.get("kv_cache", "float")),
        )
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{where}: malformed ({type(e).__name__}: {e})") from None
    if manifest.special_tokens.image_token_index != IMAGE_TOKEN_INDEX:
        raise UserError(f"{where}: image_token_index {manifest.special_tokens.image_token_index} "
                        f"!= {IMAGE_TOKEN_INDEX}, the index this runtime splices images at")
    return manifest


def _check_files(manifest: Manifest) -> None:
    files = {f"parts.{name}.file": manifest.path(name) for name in PARTS}
    files["tokenizer"] = manifest.tokenizer_path
    missing = [f"{path.name} ({key})" for key, path in files.items() if not path.is_file()]
    if missing:
        raise UserError(f"{manifest.root}: missing files {', '.join(missing)}; re-run moe-export")


def _check_io(manifest: Manifest) -> None:
    """Each part declares exactly the I/O names of the contract (order free)."""
    expected = {**PART_IO, "decoder": manifest.decoder.io_names()}
    for name, (inputs, outputs) in expected.items():
        part = manifest.parts[name]
        for kind, want, got in (("inputs", inputs, part.inputs), ("outputs", outputs, part.outputs)):
            got_names = {t.name for t in got}
            if got_names != set(want):
                missing, unexpected = sorted(set(want) - got_names), sorted(got_names - set(want))
                raise UserError(f"{manifest.root / MANIFEST_FILE}: parts.{name}.{kind} missing {missing}, "
                                f"unexpected {unexpected}")
