"""TensorRT and cuda-python, imported when an engine is opened (never at module import), the process's one
TensorRT logger, and its plugin registrations."""
from __future__ import annotations

import hashlib
import sys
from collections import deque
from pathlib import Path
from typing import Any

from runtime.errors import UserError

PLUGIN_LIBRARY = "libmoe_llava_plugin.so"
PLUGIN_ENV = "MOE_LLAVA_PLUGIN"  # overrides the plugin library an engine directory names

_LOGGER = None
_PLUGINS: dict[str, Any] = {}  # sha256 of a loaded plugin library -> its registry handle
_BUILTIN_PLUGINS: set[int] = set()  # id() of the tensorrt modules whose built-in plugins are registered


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


def init_builtin_plugins(trt) -> None:
    """Register TensorRT's own plugins (libnvinfer_plugin) once: an engine that holds one of them - a graph
    the ONNX parser mapped to a built-in plugin - deserialises only after this."""
    if id(trt) in _BUILTIN_PLUGINS or not hasattr(trt, "init_libnvinfer_plugins"):
        return
    if not trt.init_libnvinfer_plugins(trt_logger(trt), ""):
        raise UserError(f"TensorRT could not register its built-in plugins ({trt_logger(trt).last_error()}); "
                        "check that libnvinfer_plugin matches this TensorRT")
    _BUILTIN_PLUGINS.add(id(trt))


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
