"""Engine over the TensorRT engines of an export directory (`moe-run --engine-dir DIR --backend tensorrt`).

Shapes: N images, P visual tokens, S new positions, n cached positions, M max positions, H hidden, V vocab,
L layers, KVH kv heads, D head dim.

Everything lives on the device: the vision output feeds the projector directly, a decode step embeds its token
straight into the decoder's input buffer, attention_mask is a prefix of a device ones[M], position_ids a prefix
of a device arange[M] (prefill) or one slot of a device table holding n at slot n (decode: TensorRT wants every
tensor address 256-byte aligned, so arange[n:] will not do), and the KV cache is two preallocated
[L, 2, KVH*M*D] halves used in turn (the ping-pong of runtime/kv_cache.py: past = a prefix of one half viewed
[1,KVH,n,D], present written into the other). Per step only the embeddings (prefill) or one token id (decode)
go up and the logits [V] come down. All execution contexts run on one stream and share one activation block
(TensorRT's USER_MANAGED allocation), which matters on an 8 GB Jetson where GPU memory is the system's RAM.

The decoder has two optimisation profiles (export/tensorrt_profiles.py): "prefill" (S 1..M, empty past) and
"decode" (S = 1, past 0..M-1), one execution context each.

CUDA graphs (cuda_graph=True): a decode step (token upload, embed, decoder, logits download) is captured once
per (n, KV half) and replayed when that key recurs. The decoder's shapes grow by one position per step, so a
graph only pays off when requests repeat a prompt length (benchmarks, fixed templates); it is off by default.

tensorrt and cuda-python are imported when an engine is opened, never at module import.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import sys
import warnings
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from runtime.errors import UserError
from runtime.kv_cache import KINDS, check_room
from runtime.manifest import MANIFEST_FILE, PARTS, Manifest

PLUGIN_LIBRARY = "libmoe_llava_plugin.so"
PLUGIN_ENV = "MOE_LLAVA_PLUGIN"  # overrides the plugin library an engine directory names
ENGINES_KEY = "engines"  # the manifest section moe-export --target tensorrt writes
ENGINES_FORMAT = 1
PREFILL, DECODE = "prefill", "decode"
ALIGNMENT = 256  # bytes: what TensorRT requires of every tensor address (setTensorAddress)
Dims = tuple[int, ...]


# ---- lazy imports, the process-wide logger and plugin registry ----------------------------------
def import_tensorrt(fix: str = "without it use --backend onnxruntime"):
    """The tensorrt module, or a one-line UserError ending in `fix` (what the user can do instead)."""
    try:
        import tensorrt
        if getattr(tensorrt, "__version__", None) is None:  # a stray directory named tensorrt on sys.path
            raise ImportError("tensorrt is a namespace package, not TensorRT")
    except ImportError:
        raise UserError("tensorrt (TensorRT's Python bindings) is not installed: on a Jetson it comes with "
                        "JetPack (python3-libnvinfer; make the venv with --system-site-packages), elsewhere from "
                        f"NVIDIA's package index; {fix}") from None
    return tensorrt


def import_cudart():
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime  # cuda-python < 12.6 spelling
        except ImportError:
            raise UserError("cuda-python is not installed: pip install 'cuda-python>=12.6,<13' for CUDA 12 "
                            "(JetPack 6), or 'cuda-python>=13,<14' for CUDA 13 (JetPack 7)") from None
    return runtime


_LOGGER = None
_PLUGINS: dict[str, Any] = {}  # sha256 of a loaded plugin library -> its registry handle


def trt_logger(trt):
    """One ILogger for the process (TensorRT keeps the first one it is given): warnings and errors to stderr,
    the last errors kept for one-line messages."""
    global _LOGGER
    if _LOGGER is None:
        class _Logger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.errors: deque[str] = deque(maxlen=8)

            def log(self, severity, msg):
                if int(severity) <= int(trt.ILogger.Severity.ERROR):
                    self.errors.append(msg)
                if int(severity) <= int(trt.ILogger.Severity.WARNING):
                    print(f"[TensorRT] {msg}", file=sys.stderr)

            def last_error(self) -> str:
                return self.errors[-1].splitlines()[0] if self.errors else "no error logged"
        _LOGGER = _Logger()
    return _LOGGER


def load_plugin(trt, path: Path) -> None:
    """Register the plugin library's creators once per process (loadLibrary refuses creators registered
    twice, e.g. by the builder and then the runtime in one process, or the same file under two paths)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"plugin library {path} not found; build it with runtime/plugins/build.sh "
                        f"or point {PLUGIN_ENV} at it")
    key = hashlib.sha256(path.read_bytes()).hexdigest()
    if key in _PLUGINS:
        return
    handle = trt.get_plugin_registry().load_library(str(path.resolve()))
    if handle is None:
        raise UserError(f"{path}: TensorRT could not load the plugin library ({trt_logger(trt).last_error()}); "
                        "rebuild it against this device's TensorRT and CUDA (runtime/plugins/build.sh)")
    _PLUGINS[key] = handle


# ---- the manifest's engines section -------------------------------------------------------------
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
                          int(d.get("max_seq", 0)), {k: v for k, v in d.items() if k not in _ENGINE_KEYS})
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
        import os
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


_ENGINE_KEYS = ("format", "tensorrt_version", "parts", "plugin", "gpu", "max_batch", "max_seq")


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGNMENT) * ALIGNMENT


def position_table(max_len: int, dtype) -> np.ndarray:
    """[M, ALIGNMENT/itemsize] with row n = n, ...: row n's address is an aligned [1,1] position_ids = n."""
    dtype = np.dtype(dtype)
    table = np.zeros((max_len, ALIGNMENT // dtype.itemsize), dtype)
    table[:, 0] = np.arange(max_len)
    return table


def _release(version: str) -> tuple[str, ...]:
    return tuple(str(version).split(".")[:3])


# ---- device KV cache layout and the decoder's bindings (pure) -----------------------------------
@dataclass(frozen=True)
class KVLayout:
    """One device block: [2 halves, L, 2 (key, value), KVH*M*D] elements; see the module docstring."""
    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_len: int
    itemsize: int

    @property
    def slot_bytes(self) -> int:
        return _aligned(self.num_kv_heads * self.max_len * self.head_dim * self.itemsize)

    @property
    def nbytes(self) -> int:
        return 2 * self.num_layers * len(KINDS) * self.slot_bytes

    def offset(self, side: int, layer: int, kind: int) -> int:
        return ((side * self.num_layers + layer) * len(KINDS) + kind) * self.slot_bytes

    def shape(self, positions: int) -> Dims:
        return (1, self.num_kv_heads, positions, self.head_dim)  # [1,KVH,n,D], contiguous in a slot


@dataclass(frozen=True)
class DecoderBuffers:
    """Device addresses of the decoder's buffers."""
    embeds: int  # [M,H] in the decoder's input dtype
    mask: int  # ones [M]
    positions: int  # arange [M]: prefill's position_ids
    position_table: int  # M slots of ALIGNMENT bytes, slot n holding n: decode's position_ids
    logits: int  # [1,V]
    kv: int  # KVLayout.nbytes


def decoder_bindings(layout: KVLayout, buffers: DecoderBuffers, hidden: int, cached: int, new: int,
                     side: int) -> tuple[dict[str, Dims], dict[str, int]]:
    """(input shapes, tensor addresses) of one step: `cached` positions in half `side`, `new` positions in.
    Steps are a prefill (cached == 0) or one decoded position, as the decoder's two profiles are."""
    if cached and new != 1:
        raise ValueError(f"{new} new positions after {cached} cached: only prefill or single-position decode")
    shapes: dict[str, Dims] = {"inputs_embeds": (1, new, hidden), "attention_mask": (1, cached + new),
                               "position_ids": (1, new)}
    positions = buffers.position_table + cached * ALIGNMENT if cached else buffers.positions  # [n] or arange[:S]
    addresses = {"inputs_embeds": buffers.embeds, "attention_mask": buffers.mask, "logits": buffers.logits,
                 "position_ids": positions}
    for layer in range(layout.num_layers):
        for k, kind in enumerate(KINDS):
            shapes[f"past_key_values.{layer}.{kind}"] = layout.shape(cached)
            addresses[f"past_key_values.{layer}.{kind}"] = buffers.kv + layout.offset(side, layer, k)
            addresses[f"present.{layer}.{kind}"] = buffers.kv + layout.offset(1 - side, layer, k)
    return shapes, addresses


# ---- CUDA through cuda-python -------------------------------------------------------------------
class Cuda:
    """The CUDA runtime calls the engine needs; close() frees every allocation made here."""

    def __init__(self, rt):
        self.rt = rt
        self._device: list[int] = []
        self._host: list[int] = []
        self._streams: list[Any] = []

    def check(self, result, what: str):
        err, rest = result[0], result[1:]
        if err != self.rt.cudaError_t.cudaSuccess:
            name = self.rt.cudaGetErrorName(err)[1]
            name = name.decode() if isinstance(name, bytes) else str(name)
            if err == self.rt.cudaError_t.cudaErrorMemoryAllocation:
                raise UserError(f"out of GPU memory for {what}; build the engines with a smaller --max-seq, "
                                "close other GPU programs (on a Jetson the GPU shares the system RAM)")
            raise RuntimeError(f"CUDA error {name} in {what}")
        return rest[0] if len(rest) == 1 else (rest or None)

    def compute_capability(self) -> tuple[tuple[int, int], str]:
        device = self.check(self.rt.cudaGetDevice(), "cudaGetDevice")
        prop = self.check(self.rt.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
        name = prop.name.split(b"\0")[0].decode(errors="replace") if isinstance(prop.name, bytes) else prop.name
        return (int(prop.major), int(prop.minor)), str(name)

    def stream(self):
        stream = self.check(self.rt.cudaStreamCreateWithFlags(self.rt.cudaStreamNonBlocking), "a CUDA stream")
        self._streams.append(stream)
        return stream

    def malloc(self, nbytes: int, what: str) -> int:
        ptr = int(self.check(self.rt.cudaMalloc(max(int(nbytes), 1)), f"{what} ({nbytes / 2**20:.1f} MiB)"))
        self._device.append(ptr)
        return ptr

    def pinned(self, shape: Dims, dtype) -> np.ndarray:
        """Page-locked host array (what captured copies need)."""
        dtype = np.dtype(dtype)
        count = int(np.prod(shape))
        ptr = int(self.check(self.rt.cudaMallocHost(max(count * dtype.itemsize, 1)), "pinned host memory"))
        self._host.append(ptr)
        raw = (ctypes.c_uint8 * (count * dtype.itemsize)).from_address(ptr)
        return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)

    def to_device(self, array: np.ndarray, what: str) -> int:
        ptr = self.malloc(array.nbytes, what)
        self.check(self.rt.cudaMemcpy(ptr, array.ctypes.data, array.nbytes,
                                      self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice), what)
        return ptr

    def upload(self, dst: int, array: np.ndarray, stream) -> None:
        self.check(self.rt.cudaMemcpyAsync(dst, array.ctypes.data, array.nbytes,
                                           self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream), "upload")

    def download(self, array: np.ndarray, src: int, stream) -> None:
        self.check(self.rt.cudaMemcpyAsync(array.ctypes.data, src, array.nbytes,
                                           self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream), "download")

    def sync(self, stream) -> None:
        self.check(self.rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

    def capture(self, stream, enqueue: Callable[[], None]):
        """Record what `enqueue` puts on `stream` (nothing runs) -> an instantiated graph."""
        mode = self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self.check(self.rt.cudaStreamBeginCapture(stream, mode), "cudaStreamBeginCapture")
        try:
            enqueue()
        finally:
            graph = self.check(self.rt.cudaStreamEndCapture(stream), "cudaStreamEndCapture")
        try:
            return self.check(self.rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        finally:
            self.rt.cudaGraphDestroy(graph)

    def launch(self, graph_exec, stream) -> None:
        self.check(self.rt.cudaGraphLaunch(graph_exec, stream), "cudaGraphLaunch")

    def synchronize(self) -> None:
        for stream in self._streams:
            self.rt.cudaStreamSynchronize(stream)

    def close(self) -> None:
        self.synchronize()  # nothing may still be reading or writing what is freed below
        for ptr in self._device:
            self.rt.cudaFree(ptr)
        for ptr in self._host:
            self.rt.cudaFreeHost(ptr)
        for stream in self._streams:
            self.rt.cudaStreamDestroy(stream)
        self._device, self._host, self._streams = [], [], []


def detect_gpu() -> tuple[tuple[int, int], str] | None:
    """(SM, name) of the current GPU, or None without cuda-python or a GPU (the builder's --gpu auto)."""
    try:
        return Cuda(import_cudart()).compute_capability()
    except (UserError, RuntimeError):
        return None


# ---- engines and their execution contexts -------------------------------------------------------
class TrtPart:
    """One deserialised engine: its I/O names and numpy dtypes."""

    def __init__(self, trt, runtime, path: Path):
        self.path = path
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise UserError(f"{path}: TensorRT cannot deserialise it ({trt_logger(trt).last_error()}); rebuild "
                            "the engines on this device with moe-export --target tensorrt --from-onnx")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: _numpy_dtype(trt, self.engine.get_tensor_dtype(n), path, n) for n in names}

    def max_shape(self, name: str, profile: int) -> Dims:
        return tuple(self.engine.get_tensor_profile_shape(name, profile)[2])

    def scratch_bytes(self, profile: int) -> int:
        engine = self.engine
        if hasattr(engine, "get_device_memory_size_for_profile_v2"):  # 10.1+
            return int(engine.get_device_memory_size_for_profile_v2(profile))
        return int(getattr(engine, "device_memory_size_v2", None) or engine.device_memory_size)


def _numpy_dtype(trt, dtype, path: Path, name: str) -> np.dtype:
    try:
        return np.dtype(trt.nptype(dtype))
    except TypeError:
        raise UserError(f"{path}: tensor {name!r} has type {dtype}, which numpy cannot hold (bf16/fp8 I/O); "
                        "export the graph with fp16 or fp32 inputs and outputs") from None


class Runner:
    """An execution context on one profile of a part; activation memory supplied by the caller."""

    def __init__(self, trt, part: TrtPart, profile: int, stream, label: str):
        self.part, self.profile, self.label, self.stream = part, profile, label, stream
        strategy = getattr(getattr(trt, "ExecutionContextAllocationStrategy", None), "USER_MANAGED", None)
        self.user_memory = strategy is not None
        self.context = part.engine.create_execution_context(strategy) if self.user_memory \
            else part.engine.create_execution_context()
        if self.context is None:
            raise UserError(f"{part.path}: cannot create an execution context ({trt_logger(trt).last_error()})")

    def activate(self, memory: int, size: int) -> None:
        """Give the context its activation memory (shared by all contexts), then select its profile."""
        if self.user_memory:
            if hasattr(self.context, "set_device_memory"):  # 10.1+
                self.context.set_device_memory(memory, size)
            else:
                self.context.device_memory = memory
        if self.profile and not self.context.set_optimization_profile_async(self.profile, int(self.stream)):
            raise UserError(f"{self.part.path}: cannot select optimisation profile {self.profile}")

    def set_shapes(self, shapes: dict[str, Dims]) -> None:
        for name, shape in shapes.items():
            if not self.context.set_input_shape(name, tuple(int(d) for d in shape)):
                raise UserError(f"{self.label}: input {name!r} shape {tuple(shape)} lies outside the engine's "
                                f"profile {self.profile} (rebuild with a larger --max-seq / --max-batch)")

    def output_shape(self, name: str) -> Dims:
        return tuple(self.context.get_tensor_shape(name))

    def enqueue(self, shapes: dict[str, Dims], addresses: dict[str, int]) -> None:
        self.set_shapes(shapes)
        for name, ptr in addresses.items():
            if not self.context.set_tensor_address(name, int(ptr)):
                raise RuntimeError(f"{self.label}: TensorRT refused address {int(ptr):#x} for {name!r} "
                                   f"(it must be {ALIGNMENT}-byte aligned)")
        if not self.context.execute_async_v3(int(self.stream)):
            raise RuntimeError(f"{self.label}: execute_async_v3 failed")


def _nbytes(shape: Dims, dtype: np.dtype) -> int:
    return int(np.prod(shape)) * np.dtype(dtype).itemsize


class ImageEncoder:
    """vision -> projector on the device: [N,3,h,w] -> [N,P,H] float32."""

    def __init__(self, cuda: Cuda, vision: Runner, projector: Runner):
        self.cuda, self.vision, self.projector = cuda, vision, projector
        top = vision.part.max_shape("pixel_values", 0)  # [Nmax,3,h,w]
        self.max_images = top[0]
        vision.set_shapes({"pixel_values": top})
        features = vision.output_shape("image_features")  # [Nmax,P,Dv]
        projector.set_shapes({"image_features": features})
        self.dtypes = {**vision.part.dtypes, "image_embeds": projector.part.dtypes["image_embeds"]}
        self.pixels = cuda.malloc(_nbytes(top, self.dtypes["pixel_values"]), "pixel_values")
        self.features = cuda.malloc(_nbytes(features, self.dtypes["image_features"]), "image_features")
        self.embeds = cuda.malloc(_nbytes(projector.output_shape("image_embeds"), self.dtypes["image_embeds"]),
                                  "image_embeds")

    def __call__(self, pixel_values: np.ndarray) -> np.ndarray:
        if not 1 <= len(pixel_values) <= self.max_images:
            raise UserError(f"{len(pixel_values)} images; the vision engine takes 1..{self.max_images} "
                            "(rebuild with --max-batch)")
        pixels = np.ascontiguousarray(pixel_values, dtype=self.dtypes["pixel_values"])
        stream = self.vision.stream
        self.cuda.upload(self.pixels, pixels, stream)
        self.vision.enqueue({"pixel_values": pixels.shape},
                            {"pixel_values": self.pixels, "image_features": self.features})
        features = self.vision.output_shape("image_features")
        self.projector.enqueue({"image_features": features},
                               {"image_features": self.features, "image_embeds": self.embeds})
        out = np.empty(self.projector.output_shape("image_embeds"), self.dtypes["image_embeds"])  # [N,P,H]
        self.cuda.download(out, self.embeds, stream)
        self.cuda.sync(stream)
        return out.astype(np.float32, copy=False)


class Embedder:
    """embed engine: ids -> [S,H] on the host, or one token's embedding written to a device address."""

    def __init__(self, cuda: Cuda, runner: Runner):
        self.cuda, self.runner = cuda, runner
        self.ids_dtype = runner.part.dtypes["input_ids"]
        self.out_dtype = runner.part.dtypes["inputs_embeds"]
        self.max_tokens = runner.part.max_shape("input_ids", 0)[1]
        runner.set_shapes({"input_ids": (1, 1)})
        self.hidden = runner.output_shape("inputs_embeds")[-1]
        self.ids = cuda.malloc(self.max_tokens * self.ids_dtype.itemsize, "input_ids")
        self.out = cuda.malloc(self.max_tokens * self.hidden * self.out_dtype.itemsize, "inputs_embeds")
        self.token = cuda.pinned((1, 1), self.ids_dtype)  # decode's id; read by captured graphs at replay

    def to_host(self, token_ids: np.ndarray) -> np.ndarray:
        ids = np.ascontiguousarray(np.asarray(token_ids).reshape(1, -1), dtype=self.ids_dtype)  # [1,S]
        check_room(0, ids.shape[1], self.max_tokens)
        stream = self.runner.stream
        self.cuda.upload(self.ids, ids, stream)
        self.runner.enqueue({"input_ids": ids.shape}, {"input_ids": self.ids, "inputs_embeds": self.out})
        out = np.empty((ids.shape[1], self.hidden), self.out_dtype)
        self.cuda.download(out, self.out, stream)
        self.cuda.sync(stream)
        return out.astype(np.float32, copy=False)

    def enqueue_token(self, destination: int) -> None:
        """Embed self.token into `destination` (the decoder's inputs_embeds buffer); asynchronous."""
        self.cuda.upload(self.ids, self.token, self.runner.stream)
        self.runner.enqueue({"input_ids": (1, 1)}, {"input_ids": self.ids, "inputs_embeds": destination})


class DecodeGraphs:
    """Captured decode steps keyed by (cached length, KV half); least recently used dropped past `limit`."""

    def __init__(self, cuda: Cuda, stream, limit: int = 64):
        self.cuda, self.stream, self.limit = cuda, stream, limit
        self.graphs: OrderedDict[tuple[int, int], Any] = OrderedDict()
        self.enabled = True

    def launch(self, key: tuple[int, int]) -> bool:
        graph = self.graphs.get(key)
        if graph is None:
            return False
        self.graphs.move_to_end(key)
        self.cuda.launch(graph, self.stream)
        return True

    def capture(self, key: tuple[int, int], enqueue: Callable[[], None]) -> None:
        try:
            self.graphs[key] = self.cuda.capture(self.stream, enqueue)
        except (RuntimeError, UserError) as e:
            self.enabled = False
            warnings.warn(f"CUDA graph capture failed ({e}); decoding without graphs", RuntimeWarning, stacklevel=2)
            return
        if len(self.graphs) > self.limit:
            self.cuda.rt.cudaGraphExecDestroy(self.graphs.popitem(last=False)[1])

    def close(self) -> None:
        for graph in self.graphs.values():
            self.cuda.rt.cudaGraphExecDestroy(graph)
        self.graphs.clear()


class DeviceDecoder:
    """The decoder's two contexts over one device-resident KV cache."""

    def __init__(self, cuda: Cuda, prefill: Runner, decode: Runner, embedder: Embedder, manifest: Manifest,
                 max_len: int | None, cuda_graph: bool):
        self.cuda, self.prefill_runner, self.decode_runner, self.embedder = cuda, prefill, decode, embedder
        part, spec = prefill.part, manifest.decoder
        engine_max = part.max_shape("attention_mask", prefill.profile)[1]  # M
        self.max_len = min(max_len or engine_max, engine_max)
        self.hidden = spec.hidden_size
        self.dtypes = part.dtypes
        if self.dtypes["inputs_embeds"] != embedder.out_dtype:
            raise UserError(f"{part.path}: inputs_embeds is {self.dtypes['inputs_embeds']} but the embed engine "
                            f"writes {embedder.out_dtype}; re-export both parts in one precision")
        self.layout = KVLayout(spec.num_layers, spec.num_kv_heads, spec.head_dim, self.max_len,
                               self.dtypes["past_key_values.0.key"].itemsize)
        m = self.max_len
        self.buffers = DecoderBuffers(
            embeds=cuda.malloc(m * self.hidden * self.dtypes["inputs_embeds"].itemsize, "decoder inputs_embeds"),
            mask=cuda.to_device(np.ones(m, self.dtypes["attention_mask"]), "attention_mask"),
            positions=cuda.to_device(np.arange(m, dtype=self.dtypes["position_ids"]), "position_ids"),
            position_table=cuda.to_device(position_table(m, self.dtypes["position_ids"]), "position table"),
            logits=cuda.malloc(spec.vocab_size * self.dtypes["logits"].itemsize, "logits"),
            kv=cuda.malloc(self.layout.nbytes, f"the KV cache (M={m})"))
        self.logits = cuda.pinned((1, spec.vocab_size), self.dtypes["logits"])  # [1,V]
        self.graphs = DecodeGraphs(cuda, prefill.stream) if cuda_graph else None
        self.length, self.side = 0, 0  # n cached positions; the KV half that holds them

    def prefill(self, embeds: np.ndarray) -> np.ndarray:
        s = embeds.shape[0]
        check_room(0, s, self.max_len)
        self.length, self.side = 0, 0
        host = np.ascontiguousarray(embeds, dtype=self.dtypes["inputs_embeds"])  # [S,H]
        self.cuda.upload(self.buffers.embeds, host, self.prefill_runner.stream)
        self._enqueue(self.prefill_runner, s)
        return self._finish(s)

    def decode(self, token_id: int) -> np.ndarray:
        check_room(self.length, 1, self.max_len)
        self.embedder.token[...] = token_id
        key = (self.length, self.side)
        graphs = self.graphs if self.graphs is not None and self.graphs.enabled else None
        if graphs is None or not graphs.launch(key):
            self._enqueue_decode()
            if graphs is not None:  # shapes were just run once, as TensorRT wants before a capture
                self.cuda.sync(self.decode_runner.stream)
                graphs.capture(key, self._enqueue_decode)
        return self._finish(1)

    def _enqueue_decode(self) -> None:
        self.embedder.enqueue_token(self.buffers.embeds)
        self._enqueue(self.decode_runner, 1)

    def _enqueue(self, runner: Runner, new: int) -> None:
        shapes, addresses = decoder_bindings(self.layout, self.buffers, self.hidden, self.length, new, self.side)
        runner.enqueue(shapes, addresses)
        self.cuda.download(self.logits, self.buffers.logits, runner.stream)

    def _finish(self, new: int) -> np.ndarray:
        self.cuda.sync(self.prefill_runner.stream)
        self.length += new
        self.side = 1 - self.side  # the present half now holds the cache
        return self.logits[0].astype(np.float32)  # a copy: the pinned buffer is reused

    def close(self) -> None:
        if self.graphs is not None:
            self.graphs.close()


class TrtEngine:
    """runtime.engine.Engine over vision/projector/embed/decoder.engine (see the module docstring)."""

    def __init__(self, engine_dir: str | Path, manifest: Manifest | None = None, max_len: int | None = None,
                 cuda_graph: bool = False, plugin: str | Path | None = None):
        trt, rt = import_tensorrt(), import_cudart()
        self.manifest = manifest if manifest is not None else Manifest.load(engine_dir)
        self.engines = EngineSet.load(self.manifest)
        self.hidden_size = self.manifest.decoder.hidden_size
        self.cuda: Cuda | None = Cuda(rt)
        self._runners: dict[str, Runner] = {}
        self._parts: dict[str, TrtPart] = {}
        self._decoder: DeviceDecoder | None = None
        try:
            self._open(trt, max_len, cuda_graph, plugin)
        except BaseException:
            self.close()
            raise

    def _open(self, trt, max_len: int | None, cuda_graph: bool, plugin: str | Path | None) -> None:
        sm, gpu_name = self.cuda.compute_capability()
        plugin_path = self.engines.plugin_path(plugin)
        self.engines.check_files(plugin_path)
        self.engines.check_compatible(trt.__version__, sm, gpu_name)
        if plugin_path is not None:
            load_plugin(trt, plugin_path)  # before deserialising: the decoder engine holds plugin layers
        self._runtime = trt.Runtime(trt_logger(trt))
        stream = self.cuda.stream()
        self._parts = {p: TrtPart(trt, self._runtime, self.engines.path(p)) for p in PARTS}
        profile = self.engines.profile_index
        plan = {"vision": ("vision", 0), "projector": ("projector", 0), "embed": ("embed", 0),
                PREFILL: ("decoder", profile("decoder", PREFILL)), DECODE: ("decoder", profile("decoder", DECODE))}
        self._runners = {label: Runner(trt, self._parts[part], index, stream, f"{part}.engine[{label}]")
                         for label, (part, index) in plan.items()}
        scratch = max(r.part.scratch_bytes(r.profile) for r in self._runners.values())
        memory = self.cuda.malloc(scratch, "TensorRT activations")  # shared: one stream, one step at a time
        for runner in self._runners.values():
            runner.activate(memory, scratch)
        r = self._runners
        self._encoder = ImageEncoder(self.cuda, r["vision"], r["projector"])
        self._embedder = Embedder(self.cuda, r["embed"])
        self._decoder = DeviceDecoder(self.cuda, r[PREFILL], r[DECODE], self._embedder, self.manifest, max_len,
                                      cuda_graph)

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        return self._encoder(pixel_values)

    def embed_tokens(self, token_ids: np.ndarray) -> np.ndarray:
        return self._embedder.to_host(token_ids)

    def prefill(self, inputs_embeds: np.ndarray) -> np.ndarray:
        return self._decoder.prefill(inputs_embeds)

    def decode(self, token_id: int) -> np.ndarray:
        return self._decoder.decode(token_id)

    @property
    def cache_length(self) -> int:
        return self._decoder.length

    def close(self) -> None:
        if self.cuda is None:
            return
        self.cuda.synchronize()  # before any context goes
        if self._decoder is not None:
            self._decoder.close()
        # contexts before engines before the runtime, and all of them before their memory goes
        self._decoder = self._encoder = self._embedder = None
        self._runners.clear()
        self._parts.clear()
        self._runtime = None
        self.cuda.close()
        self.cuda = None

    def __enter__(self) -> TrtEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
