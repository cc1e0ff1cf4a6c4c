"""TrtEngine: runtime.engine.Engine over the TensorRT engines of an export directory
(`moe-run --engine-dir DIR --backend tensorrt`).

Everything lives on the device: the vision output feeds the projector directly, a decode step embeds its token
straight into the decoder's input buffer, and the KV cache stays there (decoder.py). All execution contexts run
on one stream and share one activation block (TensorRT's USER_MANAGED allocation), which matters on an 8 GB
Jetson where GPU memory is the system's RAM. The decoder has two optimisation profiles
(export/tensorrt_profiles.py): "prefill" (S 1..M, empty past) and "decode" (S = 1, past 0..M-1), one execution
context each.

tensorrt and cuda-python are imported when an engine is opened, never at module import.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.manifest import PARTS, Manifest

from .cuda import Cuda
from .decoder import TrtDeviceDecoder
from .encoders import TrtEmbedder, TrtImageEncoder
from .engine_set import DECODE, PREFILL, EngineSet
from .libraries import import_cudart, import_tensorrt, init_builtin_plugins, load_plugin, trt_logger
from .parts import TrtPart, TrtRunner


class TrtEngine:
    """runtime.engine.Engine over vision/projector/embed/decoder.engine (see the module docstring)."""

    def __init__(self, engine_dir: str | Path, manifest: Manifest | None = None, max_len: int | None = None,
                 cuda_graph: bool = False, plugin: str | Path | None = None):
        trt, rt = import_tensorrt(), import_cudart()
        self.manifest = manifest if manifest is not None else Manifest.load(engine_dir)
        self.engines = EngineSet.load(self.manifest)
        self.hidden_size = self.manifest.decoder.hidden_size
        self.cuda: Cuda | None = Cuda(rt)
        self._runners: dict[str, TrtRunner] = {}
        self._parts: dict[str, TrtPart] = {}
        self._decoder: TrtDeviceDecoder | None = None
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
        init_builtin_plugins(trt)  # before deserialising: an engine may hold TensorRT's own plugins
        if plugin_path is not None:
            load_plugin(trt, plugin_path)  # and the decoder engine holds MoELlavaMoE plugin layers
        self._runtime = trt.Runtime(trt_logger(trt))
        stream = self.cuda.stream()
        self._parts = {p: TrtPart(trt, self._runtime, self.engines.path(p)) for p in PARTS}
        profile = self.engines.profile_index
        plan = {"vision": ("vision", 0), "projector": ("projector", 0), "embed": ("embed", 0),
                PREFILL: ("decoder", profile("decoder", PREFILL)), DECODE: ("decoder", profile("decoder", DECODE))}
        self._runners = {label: TrtRunner(trt, self._parts[part], index, stream, f"{part}.engine[{label}]")
                         for label, (part, index) in plan.items()}
        scratch = max(r.part.scratch_bytes(r.profile) for r in self._runners.values())
        memory = self.cuda.malloc(scratch, "TensorRT activations")  # shared: one stream, one step at a time
        for runner in self._runners.values():
            runner.activate(memory, scratch)
        r = self._runners
        self._encoder = TrtImageEncoder(self.cuda, r["vision"], r["projector"])
        self._embedder = TrtEmbedder(self.cuda, r["embed"])
        self._decoder = TrtDeviceDecoder(self.cuda, r[PREFILL], r[DECODE], self._embedder, self.manifest, max_len,
                                         cuda_graph, self.engines.kv_mode)

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
