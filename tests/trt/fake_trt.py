"""Recording stand-ins for `tensorrt` and `cuda.bindings.runtime`: the builder's and TrtEngine's OWN logic runs
without TensorRT or a GPU - call order, profiles, shapes against profile ranges, tensor addresses, the KV
ping-pong and pointer arithmetic, CUDA-graph bookkeeping, the output directory.

This is NOT TensorRT and says nothing about TensorRT's behaviour: a "serialised engine" here is JSON naming the
ONNX file and the profiles, "execution" is onnxruntime on host memory that stands in for device memory, and
every "device" access is bounds-checked against the allocation it falls in. Only the API surface our code calls
(as documented for TensorRT 10.3-11.x and cuda-python 12/13) is modelled.
"""
from __future__ import annotations

import base64
import ctypes
import enum
import json
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np


# ---- cuda.bindings.runtime ----------------------------------------------------------------------
class cudaError_t(enum.IntEnum):  # noqa: N801 - the name cuda-python uses
    cudaSuccess = 0
    cudaErrorMemoryAllocation = 2
    cudaErrorInvalidValue = 1


class FakeStream:
    def __init__(self, handle: int):
        self.handle = handle

    def __int__(self) -> int:
        return self.handle


class FakeCudart:
    """Host memory posing as device memory; capture records copies and enqueues, launch replays them."""
    cudaError_t = cudaError_t
    cudaStreamNonBlocking = 1
    cudaMemcpyKind = SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2,
                                     cudaMemcpyDeviceToDevice=3)
    cudaStreamCaptureMode = SimpleNamespace(cudaStreamCaptureModeThreadLocal=1, cudaStreamCaptureModeGlobal=0)

    def __init__(self, sm=(8, 7), name=b"Fake Orin", memory_limit: int | None = None):
        self.sm, self.name, self.memory_limit = sm, name, memory_limit
        self.device: dict[int, np.ndarray] = {}  # 256-byte aligned address -> the bytes it owns
        self.host: dict[int, np.ndarray] = {}
        self.capturing: list | None = None
        self.live_graphs: set[int] = set()  # ids of graphs captured and not yet destroyed
        self.malloc_sizes: list[int] = []  # every cudaMalloc's size, in order
        self.launches = 0
        self.streams = 0

    # bookkeeping
    def block(self, ptr: int, nbytes: int, pools=("device",)) -> None:
        for pool in pools:
            for base, array in getattr(self, pool).items():
                if base <= ptr and ptr + nbytes <= base + array.nbytes:
                    return
        raise AssertionError(f"access [{ptr:#x}, +{nbytes}) outside every {'/'.join(pools)} allocation")

    def enqueue(self, op) -> None:
        if self.capturing is not None:
            self.capturing.append(op)
        else:
            op()

    # API
    def cudaGetErrorName(self, err):
        return cudaError_t.cudaSuccess, cudaError_t(err).name.encode()

    def cudaGetDevice(self):
        return cudaError_t.cudaSuccess, 0

    def cudaGetDeviceProperties(self, device):
        return cudaError_t.cudaSuccess, SimpleNamespace(major=self.sm[0], minor=self.sm[1],
                                                        name=self.name + b"\0\0")

    def cudaStreamCreateWithFlags(self, flags):
        self.streams += 1
        return cudaError_t.cudaSuccess, FakeStream(0x5000 + self.streams)

    def cudaStreamSynchronize(self, stream):
        return (cudaError_t.cudaSuccess,)

    def cudaStreamDestroy(self, stream):
        self.streams -= 1
        return (cudaError_t.cudaSuccess,)

    def _alloc(self, pool: dict, size: int):
        used = sum(a.nbytes for a in self.device.values())
        if pool is self.device and self.memory_limit is not None and used + size > self.memory_limit:
            return cudaError_t.cudaErrorMemoryAllocation, None
        raw = np.zeros(size + 256, np.uint8)
        start = -raw.ctypes.data % 256  # cudaMalloc's alignment
        array = raw[start:start + size]
        pool[array.ctypes.data] = array
        return cudaError_t.cudaSuccess, array.ctypes.data

    def cudaMalloc(self, size):
        self.malloc_sizes.append(int(size))
        return self._alloc(self.device, size)

    def cudaMallocHost(self, size):
        return self._alloc(self.host, size)

    def cudaFree(self, ptr):
        assert self.device.pop(ptr, None) is not None, "cudaFree of an unknown pointer"
        return (cudaError_t.cudaSuccess,)

    def cudaFreeHost(self, ptr):
        assert self.host.pop(ptr, None) is not None, "cudaFreeHost of an unknown pointer"
        return (cudaError_t.cudaSuccess,)

    def cudaMemcpy(self, dst, src, count, kind):
        self._check_copy(dst, src, count, kind)
        ctypes.memmove(dst, src, count)
        return (cudaError_t.cudaSuccess,)

    def cudaMemcpyAsync(self, dst, src, count, kind, stream):
        self._check_copy(dst, src, count, kind)
        if self.capturing is not None:  # captured host copies must use page-locked memory
            host = dst if kind == self.cudaMemcpyKind.cudaMemcpyDeviceToHost else src
            self.block(host, count, ("host",))
        self.enqueue(lambda: ctypes.memmove(dst, src, count))
        return (cudaError_t.cudaSuccess,)

    def _check_copy(self, dst, src, count, kind):
        k = self.cudaMemcpyKind
        if kind in (k.cudaMemcpyHostToDevice, k.cudaMemcpyDeviceToDevice):
            self.block(dst, count)
        if kind in (k.cudaMemcpyDeviceToHost, k.cudaMemcpyDeviceToDevice):
            self.block(src, count)

    def cudaStreamBeginCapture(self, stream, mode):
        assert self.capturing is None
        self.capturing = []
        return (cudaError_t.cudaSuccess,)

    def cudaStreamEndCapture(self, stream):
        graph, self.capturing = self.capturing, None
        self.live_graphs.add(id(graph))
        return cudaError_t.cudaSuccess, graph

    def cudaGraphInstantiate(self, graph, flags):
        return cudaError_t.cudaSuccess, list(graph)

    def cudaGraphLaunch(self, graph_exec, stream):
        self.launches += 1
        for op in graph_exec:
            op()
        return (cudaError_t.cudaSuccess,)

    def cudaGraphDestroy(self, graph):
        assert id(graph) in self.live_graphs, "cudaGraphDestroy of an unknown graph"
        self.live_graphs.discard(id(graph))
        return (cudaError_t.cudaSuccess,)

    def cudaGraphExecDestroy(self, graph_exec):
        return (cudaError_t.cudaSuccess,)


# ---- tensorrt -----------------------------------------------------------------------------------
class DataType(enum.Enum):
    """TensorRT 10.x / 11.x's DataType members; nptype() resolves only those numpy can hold, as TensorRT's does."""
    FLOAT = "float32"
    HALF = "float16"
    BF16 = None
    INT8 = "int8"
    INT32 = "int32"
    INT64 = "int64"
    BOOL = "bool"
    UINT8 = "uint8"
    FP8 = "fp8"
    INT4 = "int4"
    FP4 = "fp4"


def nptype(dtype: DataType):
    if dtype.value not in ("float32", "float16", "int8", "int32", "int64", "bool", "uint8"):
        raise TypeError(f"Could not resolve TensorRT datatype {dtype.name} to an equivalent numpy datatype.")
    return np.dtype(dtype.value).type


class Severity(enum.IntEnum):
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


class ILogger:
    Severity = Severity

    def __init__(self):
        pass


def make_tensorrt(cudart: FakeCudart, version: str = "10.3.0.30") -> types.ModuleType:
    """A module object that answers `import tensorrt` for the calls our code makes."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.ILogger = ILogger
    trt.DataType = DataType
    trt.IStreamReaderV2, trt.SeekPosition = IStreamReaderV2, SeekPosition
    trt.nptype = nptype
    trt.NetworkDefinitionCreationFlag = SimpleNamespace(STRONGLY_TYPED=1)
    trt.MemoryPoolType = SimpleNamespace(WORKSPACE="workspace")
    trt.TensorIOMode = SimpleNamespace(INPUT="input", OUTPUT="output")
    trt.ExecutionContextAllocationStrategy = SimpleNamespace(USER_MANAGED="user_managed", STATIC="static")
    trt.log = SimpleNamespace(plugins=[], builds=[], builtin_plugins=0, deserialised=[])
    trt.registry = Registry(trt.log)
    trt.get_plugin_registry = lambda: trt.registry
    trt.init_libnvinfer_plugins = lambda logger, namespace: trt.registry.init_builtin(namespace)
    trt.Builder = lambda logger: Builder(trt)
    trt.OnnxParser = lambda network, logger: OnnxParser(network, trt.registry)
    trt.Runtime = lambda logger: Runtime(trt, cudart)
    return trt


# The creator a plugin library's getCreators hands to loadLibrary, which registers it under the namespace the
# creator reports (runtime/plugins/moe_plugin.h: "MoELlavaMoE", version "1", namespace "moe_llava").
PLUGIN_CREATORS = (("MoELlavaMoE", "1", "moe_llava"),)
BUILTIN_CREATORS = (("EfficientNMS_TRT", "1", ""),)  # one of libnvinfer_plugin's, registered by init


class Registry:
    def __init__(self, log):
        self.log, self.creators = log, set()

    def load_library(self, path):
        self.log.plugins.append(path)
        self.creators.update(PLUGIN_CREATORS)
        return object()

    def init_builtin(self, namespace):
        self.log.builtin_plugins += 1
        self.creators.update((name, version, namespace) for name, version, _ in BUILTIN_CREATORS)
        return True


class Runtime:
    def __init__(self, trt, cudart: FakeCudart):
        self.trt, self.cudart = trt, cudart

    def deserialize_cuda_engine(self, source):
        """Bytes-like (a memory map included) or an IStreamReaderV2, read as TensorRT does: asking for what is
        left until it has it all. The plugin layers' creators must be registered by then."""
        if isinstance(source, self.trt.IStreamReaderV2):
            data, how = read_stream(source, self.trt), "stream"
        else:
            data, how = bytes(memoryview(source)), type(source).__name__
        plan = json.loads(data)
        missing = [c for c in map(tuple, plan["plugins"]) if c not in self.trt.registry.creators]
        if missing:
            return None  # TensorRT: "getPluginCreator could not find plugin ..."
        self.trt.log.deserialised.append(how)
        return Engine(plan, self.cudart)


def read_stream(reader, trt) -> bytes:
    assert reader.seek(0, trt.SeekPosition.END) and reader.seek(0, trt.SeekPosition.SET)
    chunks = []
    while True:
        chunk = reader.read(1 << 40, 0)  # "give me everything": the reader decides how much per call
        if not chunk:
            return b"".join(chunks)
        reader.max_chunk = max(getattr(reader, "max_chunk", 0), len(chunk))
        chunks.append(bytes(chunk))


class Builder:
    def __init__(self, trt):
        self.trt = trt

    def create_network(self, flags):
        return Network(flags)

    def create_builder_config(self):
        return Config()

    def create_optimization_profile(self):
        return Profile()

    def build_serialized_network(self, network, config):
        self.trt.log.builds.append({"flags": network.flags, "workspace": config.workspace})
        model = base64.b64encode(Path(network.path).read_bytes()).decode()  # self-contained, like a plan
        return json.dumps({"onnx": model, "profiles": [p.shapes for p in config.profiles],
                           "plugins": sorted(network.plugins)}).encode()


class Network:
    def __init__(self, flags):
        self.flags, self.path, self.inputs, self.num_inputs = flags, None, [], 0
        self.plugins: set[tuple[str, str, str]] = set()  # (name, version, namespace) of its plugin layers

    def get_input(self, i):
        return SimpleNamespace(name=self.inputs[i])


class OnnxParser:
    """What TensorRT's ONNX parser (onnx-tensorrt 10.x) refuses, for the graphs we emit:
    - ScatterND with a `reduction` attribute ("Attribute reduction is not supported"; ScatterMode has only
      ELEMENT and ND);
    - a node outside the standard domain that no registered plugin creator answers to. As the parser's plugin
      fallback does: name = op_type, version = `plugin_version` ("1" when absent), namespace =
      `plugin_namespace` - when absent, "" and then the node's domain."""
    STANDARD_DOMAINS = ("", "ai.onnx")

    def __init__(self, network, registry):
        self.network, self.registry, self.errors = network, registry, []

    @property
    def num_errors(self):
        return len(self.errors)

    def get_error(self, i):
        return self.errors[i]

    def parse_from_file(self, path):
        import onnx

        graph = onnx.load(path, load_external_data=False).graph
        for node in graph.node:
            problem = self._check(node)
            if problem:
                self.errors.append(ParserError(problem, node.name))
        if self.errors:
            return False
        initializers = {t.name for t in graph.initializer}
        self.network.path = path
        self.network.inputs = [v.name for v in graph.input if v.name not in initializers]
        self.network.num_inputs = len(self.network.inputs)
        return True

    def _check(self, node) -> str | None:
        attrs = {a.name: a for a in node.attribute}
        if node.op_type == "ScatterND" and "reduction" in attrs:
            return "Attribute reduction is not supported."
        if node.domain in self.STANDARD_DOMAINS:
            return None
        version = attrs["plugin_version"].s.decode() if "plugin_version" in attrs else "1"
        namespaces = [attrs["plugin_namespace"].s.decode()] if "plugin_namespace" in attrs else ["", node.domain]
        for namespace in namespaces:
            if (node.op_type, version, namespace) in self.registry.creators:
                self.network.plugins.add((node.op_type, version, namespace))
                return None
        return (f"No importer registered for op: {node.op_type} (domain {node.domain!r}); plugin creator "
                f"{node.op_type} version {version} namespace {'/'.join(map(repr, namespaces))} not found")


class ParserError:
    def __init__(self, desc: str, node_name: str):
        self._desc, self._node = desc, node_name

    def desc(self):
        return self._desc

    def node_name(self):
        return self._node

    def node(self):
        return -1


class IStreamReaderV2:
    def __init__(self):
        pass


class SeekPosition(enum.Enum):
    SET = 0
    CUR = 1
    END = 2


class Config:
    def __init__(self):
        self.profiles, self.workspace, self.cache = [], None, None

    def set_memory_pool_limit(self, pool, size):
        self.workspace = size

    def create_timing_cache(self, data):
        return SimpleNamespace(serialize=lambda: b"fake timing cache", loaded=data)

    def set_timing_cache(self, cache, ignore_mismatch):
        self.cache = cache
        return True

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)
        return len(self.profiles) - 1


class Profile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, lo, opt, hi):
        self.shapes[name] = [list(lo), list(opt), list(hi)]


class Engine:
    """Runs the ONNX file with onnxruntime; I/O types are the graph's."""

    def __init__(self, plan: dict, cudart: FakeCudart):
        import onnxruntime as ort

        self.cudart, self.profiles = cudart, plan["profiles"]
        self.session = ort.InferenceSession(base64.b64decode(plan["onnx"]), providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        types_ = {i.name: i.type for i in self.session.get_inputs() + self.session.get_outputs()}
        ort_to_np = {"tensor(float)": DataType.FLOAT, "tensor(float16)": DataType.HALF,
                     "tensor(bfloat16)": DataType.BF16, "tensor(int64)": DataType.INT64,
                     "tensor(int32)": DataType.INT32, "tensor(int8)": DataType.INT8, "tensor(uint8)": DataType.UINT8,
                     "tensor(bool)": DataType.BOOL, "tensor(float8e4m3fn)": DataType.FP8}
        self.dtypes = {name: ort_to_np[t] for name, t in types_.items()}
        self.num_io_tensors = len(self.inputs) + len(self.outputs)
        self.num_optimization_profiles = len(self.profiles)

    def get_tensor_name(self, i):
        return (self.inputs + self.outputs)[i]

    def get_tensor_mode(self, name):
        return "input" if name in self.inputs else "output"

    def get_tensor_dtype(self, name):
        return self.dtypes[name]

    def get_tensor_profile_shape(self, name, profile):
        return [tuple(s) for s in self.profiles[profile][name]]

    def get_device_memory_size_for_profile_v2(self, profile):
        return 4096 * (profile + 1)

    def create_execution_context(self, strategy=None):
        return Context(self, strategy)


class Context:
    def __init__(self, engine: Engine, strategy):
        self.engine, self.strategy = engine, strategy
        self.profile, self.shapes, self.addresses, self.memory = 0, {}, {}, None
        self.runs = 0

    def set_optimization_profile_async(self, index, stream):
        assert isinstance(stream, int)
        self.profile = index
        return index < len(self.engine.profiles)

    def set_device_memory(self, ptr, size):
        self.engine.cudart.block(ptr, size)
        self.memory = ptr

    def set_input_shape(self, name, shape):
        lo, _, hi = self.engine.profiles[self.profile][name]
        if len(shape) != len(lo) or not all(a <= d <= b for a, d, b in zip(lo, shape, hi)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        if name in self.shapes:
            return self.shapes[name]
        outputs = self._compute(self._zeros())
        return outputs[self.engine.outputs.index(name)].shape

    def set_tensor_address(self, name, ptr):
        assert name in self.engine.inputs + self.engine.outputs, name
        if ptr % 256:  # "The pointer must have at least 256-byte alignment." (NvInferRuntime.h)
            return False
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream_handle):
        assert isinstance(stream_handle, int)
        assert self.strategy is None or self.memory is not None, "USER_MANAGED context without device memory"
        missing = set(self.engine.inputs + self.engine.outputs) - set(self.addresses)
        assert not missing, f"no address for {sorted(missing)}"
        shapes, addresses = dict(self.shapes), dict(self.addresses)
        self.engine.cudart.enqueue(lambda: self._run(shapes, addresses))
        return True

    def _zeros(self):
        return {n: np.zeros(self.shapes[n], nptype(self.engine.dtypes[n])) for n in self.engine.inputs}

    def _compute(self, feeds):
        return self.engine.session.run(None, feeds)

    def _run(self, shapes, addresses):
        self.runs += 1
        feeds = {}
        for name in self.engine.inputs:
            dtype = np.dtype(nptype(self.engine.dtypes[name]))
            nbytes = int(np.prod(shapes[name])) * dtype.itemsize
            self.engine.cudart.block(addresses[name], nbytes)
            raw = (ctypes.c_uint8 * nbytes).from_address(addresses[name]) if nbytes else b""
            feeds[name] = np.frombuffer(bytes(raw), dtype).reshape(shapes[name])
        for name, value in zip(self.engine.outputs, self._compute(feeds)):
            value = np.ascontiguousarray(value, nptype(self.engine.dtypes[name]))
            self.engine.cudart.block(addresses[name], value.nbytes)
            ctypes.memmove(addresses[name], value.ctypes.data, value.nbytes)
