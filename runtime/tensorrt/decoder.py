"""The decoder on the device (TrtDeviceDecoder): its prefill and decode contexts over one KV cache, the decode
step's CUDA graphs (DecodeGraphs).

Per step only the embeddings (prefill) or one token id (decode) go up and the logits [V] come down:
attention_mask is a prefix of a device ones[M], position_ids a prefix of a device arange[M] (prefill) or one
row of a device table holding n at row n (decode: TensorRT wants every tensor address 256-byte aligned, so
arange[n:] will not do), and the KV cache is kv_layout.KVLayout.

CUDA graphs (cuda_graph=True): a decode step (token upload, embed, decoder, logits download) is captured once
per (n, KV copy) and replayed when that key recurs. The decoder's shapes grow by one position per step, so a
graph only pays off when requests repeat a prompt length (benchmarks, fixed templates); it is off by default.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Any, Callable

import numpy as np

from runtime.errors import UserError
from runtime.kv_cache import check_room
from runtime.manifest import Manifest

from .cuda import Cuda
from .encoders import TrtEmbedder
from .kv_layout import DecoderBuffers, KVLayout, decoder_bindings, position_table
from .memory import KVMode
from .parts import TrtRunner


class DecodeGraphs:
    """Captured decode steps keyed by (cached length, KV copy); least recently used dropped past `limit`."""

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


class TrtDeviceDecoder:
    """The decoder's two contexts over one device-resident KV cache."""

    def __init__(self, cuda: Cuda, prefill: TrtRunner, decode: TrtRunner, embedder: TrtEmbedder, manifest: Manifest,
                 max_len: int | None, cuda_graph: bool, kv_mode: KVMode = KVMode.CONCAT):
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
                               self.dtypes["past_key_values.0.key"].itemsize, kv_mode)
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
        self.length, self.side = 0, 0  # n cached positions; the KV copy that holds them

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

    def _enqueue(self, runner: TrtRunner, new: int) -> None:
        shapes, addresses = decoder_bindings(self.layout, self.buffers, self.hidden, self.length, new, self.side)
        runner.enqueue(shapes, addresses)
        self.cuda.download(self.logits, self.buffers.logits, runner.stream)

    def _finish(self, new: int) -> np.ndarray:
        self.cuda.sync(self.prefill_runner.stream)
        self.length += new
        self.side = self.layout.next_side(self.side)  # where the cache is now
        return self.logits[0].astype(np.float32)  # a copy: the pinned buffer is reused

    def close(self) -> None:
        if self.graphs is not None:
            self.graphs.close()
