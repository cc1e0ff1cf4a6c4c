"""Deserialise an engine file without a second whole-file copy in host memory (on a Jetson, host memory is the
GPU's memory: a 3 GB engine read whole costs 3 GB of RAM while TensorRT copies it to the device).

Which API, by TensorRT version (Python bindings):
  >= 10.9   IStreamReaderV2 (read(num_bytes, stream) / seek): TensorRT pulls the file through it in pieces of at
            most READ_CHUNK_BYTES. Added in 10.7; versions before 10.9 mis-handle partial reads
            (NVIDIA/TensorRT#4327), so they are not offered it. 11.x deprecates IStreamReader (V1) for V2.
  10.3-10.8 deserialize_cuda_engine(buffer) given a read-only memory map of the file: the bytes are the page
            cache's, shared with the file and dropped by the kernel under pressure - never an anonymous copy.
The same memory map is the fallback for any version whose bindings lack IStreamReaderV2 / SeekPosition.
"""
from __future__ import annotations

import mmap
import re
from pathlib import Path

READ_CHUNK_BYTES = 64 << 20
STREAM_READER_MIN = (10, 9)


def deserialize_engine(trt, runtime, path: Path):
    """runtime.deserialize_cuda_engine from `path` (None when TensorRT refuses it, as TensorRT returns)."""
    with open(path, "rb") as file:
        if uses_stream_reader(trt):
            return runtime.deserialize_cuda_engine(_file_reader(trt, file))
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return runtime.deserialize_cuda_engine(mapped)  # TensorRT copies what it keeps before returning


def uses_stream_reader(trt) -> bool:
    has_api = hasattr(trt, "IStreamReaderV2") and hasattr(trt, "SeekPosition")
    return has_api and _major_minor(trt.__version__) >= STREAM_READER_MIN


def _major_minor(version: str) -> tuple[int, int]:
    numbers = [int(re.match(r"\d*", p).group() or 0) for p in (str(version).split(".") + ["0", "0"])[:2]]
    return numbers[0], numbers[1]


def _file_reader(trt, file):
    """An IStreamReaderV2 over an open file: at most READ_CHUNK_BYTES per read (TensorRT asks again for the
    rest), seek as the file's."""
    # (sign, whence): END offsets count backwards from the end of the stream
    how = {trt.SeekPosition.SET: (1, 0), trt.SeekPosition.CUR: (1, 1), trt.SeekPosition.END: (-1, 2)}

    class FileReader(trt.IStreamReaderV2):
        def __init__(self):
            trt.IStreamReaderV2.__init__(self)

        def read(self, num_bytes: int, stream: int) -> bytes:
            return file.read(min(int(num_bytes), READ_CHUNK_BYTES))

        def seek(self, offset: int, where) -> bool:
            sign, whence = how[where]
            try:
                file.seek(sign * int(offset), whence)
            except (OSError, ValueError):
                return False
            return True

    return FileReader()
