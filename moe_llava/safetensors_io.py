"""Safetensors read and written one tensor at a time, so a checkpoint never sits in memory whole.

File layout (the format's spec): u64 little-endian header length n, n bytes of JSON
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the tensor bytes,
offsets relative to the end of the header. Reading uses plain `readinto` into a fresh buffer rather than
a memory map: a map's touched pages count towards the process's resident memory until it is closed,
which would add a whole shard on top of the converted weights.
A truncated or corrupt file is a `UserError` naming the file, never a library traceback.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from runtime.errors import UserError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 << 20  # the reference implementation's own limit


@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors file: where its bytes are (absolute file offsets) and what they are."""
    path: Path
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: Path) -> dict[str, Entry]:
    """Every tensor's entry; checks that the header parses and the data is all there."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise _damaged(path, "shorter than a safetensors header")
        (length,) = struct.unpack("<Q", raw)
        if length > min(_MAX_HEADER, size - 8):
            raise _damaged(path, f"header length {length} does not fit the {size}-byte file")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _damaged(path, "header is not JSON") from None
    header.pop("__metadata__", None)
    entries = {name: _entry(path, name, info, 8 + length) for name, info in header.items()}
    data_end = max((e.end for e in entries.values()), default=8 + length)
    if data_end > size:
        raise _damaged(path, f"truncated: tensors need {data_end} bytes, the file has {size}")
    return entries


def _entry(path: Path, name: str, info, base: int) -> Entry:
    try:
        dtype, shape, (begin, end) = DTYPES[info["dtype"]], tuple(info["shape"]), info["data_offsets"]
    except (KeyError, TypeError, ValueError):
        raise _damaged(path, f"bad header entry for {name!r}") from None
    numel = 1
    for d in shape:
        numel *= d
    if end - begin != numel * dtype.itemsize:
        raise _damaged(path, f"{name}: {end - begin} bytes for shape {list(shape)} {info['dtype']}")
    return Entry(path, name, dtype, shape, base + begin, base + end)


def _damaged(path: Path, why: str) -> UserError:
    return UserError(f"{path}: damaged safetensors file ({why}); re-download or rewrite it")


def read_tensor(f, entry: Entry) -> torch.Tensor:
    """The tensor of `entry` from the open file `f`, in its stored dtype (a fresh, owned buffer)."""
    buffer = torch.empty(entry.nbytes, dtype=torch.uint8)
    f.seek(entry.begin)
    if f.readinto(buffer.numpy()) != entry.nbytes:
        raise _damaged(entry.path, f"{entry.name} is cut short")
    return buffer.view(entry.dtype).reshape(entry.shape)


# ---- writing ---------------------------------------------------------------------------------------
def write_streamed(path: Path, specs: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
                   make: Callable[[str], torch.Tensor], metadata: dict[str, str] | None = None) -> int:
    """Write the tensors named in `specs`, each produced by `make(name)` just before it is written.

    Only one tensor is alive at a time. Returns the bytes of tensor data written.
    """
    header, offset, order = {}, 0, []
    for name, dtype, shape in specs:
        nbytes = dtype.itemsize
        for d in shape:
            nbytes *= d
        header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        order.append((name, dtype, tuple(shape)))
        offset += nbytes
    header["__metadata__"] = metadata or {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, dtype, shape in order:
            tensor = make(name)
            if tensor.dtype != dtype or tuple(tensor.shape) != shape:
                raise ValueError(f"{name}: made {tensor.dtype} {tuple(tensor.shape)}, declared {dtype} {shape}")
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
    return offset
