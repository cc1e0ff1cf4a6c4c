"""An ONNX graph's initializers read and written one tensor at a time, so a part of any size is quantised in
about the memory of its largest tensor (the 12.8 GB fp32 decoder of a released StableLM-1.6B-4e included).

The graph is loaded without its external data (`onnx.load(..., load_external_data=False)`): large
initializers are then references (file, offset, length) into `<part>.onnx.data`. `read` reads one tensor (or
some rows of it) with plain file reads - no memory map, whose touched pages would stay resident and count as a
second copy; `add` appends a new tensor to the output's data file at once and records only the reference;
`finish` copies the initializers the graph still uses across in chunks. Tensors under INLINE_BYTES stay inside
the graph, as onnx.save would keep them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

INLINE_BYTES = 1 << 20      # smaller tensors stay in the graph proto
ALIGN = 4096                # external tensors start on a page: onnxruntime can map them in place
COPY_CHUNK = 64 << 20


def is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def _external_info(tensor: onnx.TensorProto) -> tuple[str, int, int | None]:
    info = {e.key: e.value for e in tensor.external_data}
    length = info.get("length")
    return info["location"], int(info.get("offset", 0)), int(length) if length is not None else None


def _nbytes(tensor: onnx.TensorProto) -> int:
    itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


class TensorIO:
    """Initializer access for one graph: `source_dir` holds its external data; `data_path` (optional) is the
    external data file new and kept tensors go to. Without `data_path` everything stays in the proto."""

    def __init__(self, model: onnx.ModelProto, source_dir: Path | None = None, data_path: Path | None = None,
                 progress: str | None = None):
        self.model = model
        self.source_dir = Path(source_dir) if source_dir else None
        self.data_path = Path(data_path) if data_path else None
        self._out = open(self.data_path, "wb") if self.data_path else None
        self._tensors = {t.name: t for t in model.graph.initializer}
        self._written: set[str] = set()   # tensors already in the output's data file
        self._views: dict[str, tuple[str, np.dtype, bool]] = {}   # (source, dtype, transposed)
        self._bar = None
        if progress:   # bytes of weights read (each is read once): the quantising phase's progress and ETA
            from tqdm import tqdm
            total = sum(_nbytes(t) for t in model.graph.initializer)
            self._bar = tqdm(total=total, desc=progress, unit="B", unit_scale=True, leave=False)

    def absorb_casts(self) -> int:
        """Cast(initializer) and Transpose(initializer, perm=[1, 0]) nodes, chained in any order, become
        initializers read through the cast / transposition; nothing is materialised until it is read.

        A model that keeps 16-bit weights and computes in fp32 (moe_llava/upcast.py) traces its Linears to
        MatMul(x, Transpose(Cast(W16))): the quantisers then see a plain fp32 [K, N] weight, and quantise it
        straight from W16's rows. Returns how many nodes were absorbed."""
        kept = []
        for node in self.model.graph.node:
            view = self._view_of(node)
            if view is None:
                kept.append(node)
                continue
            source, dtype, transposed = view
            dims = self._tensors[node.input[0]].dims
            proto = onnx.TensorProto(name=node.output[0], data_type=helper.np_dtype_to_tensor_dtype(dtype),
                                     dims=list(reversed(dims)) if node.op_type == "Transpose" else dims)
            self._views[proto.name] = view
            self.model.graph.initializer.append(proto)
            self._tensors[proto.name] = proto
        absorbed = len(self.model.graph.node) - len(kept)
        del self.model.graph.node[:]
        self.model.graph.node.extend(kept)
        return absorbed

    def _view_of(self, node: onnx.NodeProto) -> tuple[str, np.dtype, bool] | None:
        """(source initializer, dtype read as, transposed) for a Cast / 2-D Transpose of a weight, else None."""
        if node.op_type not in ("Cast", "Transpose") or not node.input or node.input[0] not in self._tensors:
            return None
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        source, dtype, transposed = self._views.get(node.input[0], (node.input[0], None, False))
        dtype = dtype or np.dtype(helper.tensor_dtype_to_np_dtype(self._tensors[source].data_type))
        if node.op_type == "Cast":
            return source, np.dtype(helper.tensor_dtype_to_np_dtype(attrs["to"])), transposed
        if len(self._tensors[node.input[0]].dims) == 2 and list(attrs.get("perm", [1, 0])) == [1, 0]:
            return source, dtype, not transposed
        return None

    # ---- reading --------------------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].dims)

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start:stop) of the leading axis of initializer `name` (the whole tensor by default)."""
        if name in self._views:
            source, dtype, transposed = self._views[name]
            if transposed:   # whole tensors only (materialising a view); quantisers read the source's rows
                assert start == 0 and stop is None, "a transposed view is read whole"
                return np.ascontiguousarray(self.read(source).astype(dtype).T)
            return self.read(source, start, stop).astype(dtype)
        tensor = self._tensors[name]
        if not is_external(tensor):
            array = numpy_helper.to_array(tensor)
            return array if start == 0 and stop is None else array[start:stop]
        shape = tuple(tensor.dims)
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
        stop = shape[0] if stop is None else min(stop, shape[0])
        row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        location, offset, _ = _external_info(tensor)
        path = self.source_dir / location
        if name in self._written:   # written by this TensorIO (a folded weight): read it back from the output
            self._out.flush()
            path = self.data_path
        with open(path, "rb") as f:
            f.seek(offset + start * row)
            data = np.fromfile(f, dtype=dtype, count=(stop - start) * row // dtype.itemsize)
        if data.size * dtype.itemsize != (stop - start) * row:
            raise OSError(f"{path}: truncated (tensor {name})")
        if self._bar is not None:
            self._bar.update(data.nbytes)
        return data.reshape(stop - start, *shape[1:])

    def quantize(self, name: str, spec, k_first: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """blockwise.quantize of initializer `name` ([..., N, K]; k_first: a MatMul weight [K, N], quantised
        as its transpose), read a chunk at a time."""
        from .blockwise import quantize_chunked
        dtype = helper.tensor_dtype_to_np_dtype(self._tensors[name].data_type)
        source, _, transposed = self._views.get(name, (name, None, False))
        if transposed:   # a transposed view: the stored rows are the other axis (W^T's blocks are W's rows)
            return quantize_chunked(lambda a, b: self.read(source, a, b).astype(dtype), self.shape(source),
                                    dtype, spec, not k_first)
        return quantize_chunked(lambda a, b: self.read(name, a, b), self.shape(name), dtype, spec, k_first)

    # ---- writing --------------------------------------------------------------------------------
    def add(self, name: str, array: np.ndarray) -> onnx.TensorProto:
        """A new initializer `name` holding `array` (written out now when it is large)."""
        array = np.ascontiguousarray(array)
        if self._out is None or array.nbytes < INLINE_BYTES:
            tensor = numpy_helper.from_array(array, name)
        else:
            tensor = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype),
                                      dims=array.shape)
            offset = self._pad()
            self._out.write(array.tobytes())
            self._point(tensor, offset, array.nbytes)
            self._written.add(name)
        self.model.graph.initializer.append(tensor)
        self._tensors[name] = tensor
        return tensor

    def finish(self) -> int:
        """Drop initializers no node reads, copy the external ones still used into the output's data file;
        returns the output's external bytes. Closes the data file."""
        used = {i for n in self.model.graph.node for i in n.input} | {o.name for o in self.model.graph.output}
        kept = [t for t in self.model.graph.initializer if t.name in used and t.name not in self._views]
        del self.model.graph.initializer[:]
        self.model.graph.initializer.extend(kept)
        for name in self._views.keys() & used:   # casts nothing quantised: their values, cast, written out
            self.add(name, self.read(name))
        self._views.clear()
        self._tensors = {t.name: t for t in self.model.graph.initializer}   # the graph's own messages:
        for tensor in self.model.graph.initializer:                          # extend() stored copies
            if is_external(tensor) and tensor.name not in self._written:
                self._copy(tensor, *_external_info(tensor))
        if self._bar is not None:
            self._bar.close()
        written = self._out.tell() if self._out else 0
        if self._out:
            self._out.close()
            self._out = None
        return written

    def _copy(self, tensor: onnx.TensorProto, location: str, offset: int, length: int | None) -> None:
        if self._out is None:  # no output file: bring the bytes into the proto
            array = self.read(tensor.name)
            tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
            return
        length = length if length is not None else (self.source_dir / location).stat().st_size - offset
        start = self._pad()
        with open(self.source_dir / location, "rb") as f:
            f.seek(offset)
            left = length
            while left:
                chunk = f.read(min(COPY_CHUNK, left))
                if not chunk:
                    raise OSError(f"{self.source_dir / location}: truncated (tensor {tensor.name})")
                self._out.write(chunk)
                left -= len(chunk)
        self._point(tensor, start, length)

    def _pad(self) -> int:
        here = self._out.tell()
        if here % ALIGN:
            self._out.write(b"\0" * (ALIGN - here % ALIGN))
        return self._out.tell()

    def _point(self, tensor: onnx.TensorProto, offset: int, length: int) -> None:
        tensor.ClearField("raw_data")
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.data_path.name), ("offset", str(offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
