"""The weight files of a checkpoint directory, opened lazily: names and shapes first, each tensor on demand.

    (sharded) safetensors   model.safetensors(.index.json)    header read only; tensors read one at a time
    (sharded) pickled .bin  pytorch_model.bin(.index.json)    memory-mapped, weights_only (no arbitrary code)

Any truncated or corrupt file ends in a `UserError` naming that file.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from runtime.errors import UserError

from .safetensors_io import Entry, read_header, read_tensor

SAFETENSORS_INDEX, BIN_INDEX = "model.safetensors.index.json", "pytorch_model.bin.index.json"


class WeightFiles:
    """name -> tensor of every weight file in a directory; a context manager that closes its files."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._entries: dict[str, Entry] = {}
        self._pickled: dict[str, torch.Tensor] = {}
        self._open: dict[Path, object] = {}
        files, is_safetensors = _weight_files(self.directory)
        for path in files:
            if is_safetensors:
                self._entries.update(read_header(path))
            else:
                self._pickled.update(_load_bin(path))

    def __enter__(self) -> "WeightFiles":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()

    @property
    def names(self) -> list[str]:
        return list(self._entries) + list(self._pickled)

    def meta(self, name: str) -> torch.Tensor:
        """A shape-and-dtype stand-in (meta device) for `name`."""
        if name in self._entries:
            e = self._entries[name]
            return torch.empty(e.shape, dtype=e.dtype, device="meta")
        return self._pickled[name].to("meta")

    def nbytes(self, name: str) -> int:
        t = self.meta(name)
        return t.numel() * t.element_size()

    def read(self, name: str) -> torch.Tensor:
        """The tensor in its stored dtype (safetensors: a fresh buffer; .bin: a view of the mapped file)."""
        if name in self._pickled:
            return self._pickled[name]
        entry = self._entries[name]
        if entry.path not in self._open:
            self._open[entry.path] = open(entry.path, "rb")
        return read_tensor(self._open[entry.path], entry)

    def stored_dtype(self) -> torch.dtype:
        """The dtype most of the floating-point weights are stored in."""
        counts: dict[torch.dtype, int] = {}
        for name in self.names:
            t = self.meta(name)
            if t.is_floating_point():
                counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
        return max(counts, key=counts.get) if counts else torch.float32


def _weight_files(directory: Path) -> tuple[list[Path], bool]:
    for index_name, single, is_safetensors in ((SAFETENSORS_INDEX, "model.safetensors", True),
                                                (BIN_INDEX, "pytorch_model.bin", False)):
        index = directory / index_name
        if index.is_file():
            return [directory / f for f in _shards(index)], is_safetensors
        if (directory / single).is_file():
            return [directory / single], is_safetensors
    raise UserError(f"no weights in {directory}: expected model.safetensors(.index.json) or pytorch_model.bin")


def _shards(index: Path) -> list[str]:
    try:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise UserError(f"{index}: damaged index (no weight_map); re-download or rewrite it") from None
    missing = [f for f in files if not (index.parent / f).is_file()]
    if missing:
        raise UserError(f"{index} names shards that are not there: {', '.join(missing)}")
    return files


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    """weights_only: never unpickle arbitrary objects; mmap: pages are read only when a tensor is used."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # the legacy (pre-zip) format cannot be mapped: read it whole
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e).lower() or "weights only" in str(e).lower():
            raise UserError(f"{path}: holds objects other than tensors, refused (weights_only); convert the "
                            "checkpoint to safetensors") from None
        raise UserError(f"{path}: damaged PyTorch weights file (UnpicklingError); re-download or rewrite it") from None
    except Exception as e:  # noqa: BLE001 - unpickling fails in many ways; each means the same here
        raise UserError(f"{path}: damaged PyTorch weights file ({type(e).__name__}); re-download or rewrite "
                        "it") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: not a state dict of tensors")
    return state
