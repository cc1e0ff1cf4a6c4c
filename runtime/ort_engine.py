"""Engine over an export directory with ONNX Runtime (CPU by default, CUDA when requested and available).

Shapes: N images, P visual tokens, S new positions, n cached positions, H hidden, V vocab, L layers,
KVH kv heads, D head dim. onnxruntime is imported on first use, so the package imports without it.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from runtime.errors import UserError
from runtime.kv_cache import KINDS, KVCache, SharedKVCache, check_room
from runtime.manifest import Manifest, PartSpec

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
PROVIDER_ALIASES = {"cpu": CPU, "cuda": CUDA}


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise UserError("onnxruntime is not installed: pip install onnxruntime (the '.[cpu]' or '.[runtime]' "
                        "extra), or onnxruntime-gpu for CUDA ('.[gpu]'; Jetson: docs/jetson.md)") from None
    return onnxruntime


def resolve_providers(ort, providers: Sequence[str] | None) -> list[str]:
    """Requested execution providers that this onnxruntime build has, CPU last as the fallback."""
    requested = [PROVIDER_ALIASES.get(p.lower(), p) for p in (providers or [CPU])]
    available = set(ort.get_available_providers())
    missing = [p for p in requested if p not in available]
    if missing:
        warnings.warn(f"onnxruntime {ort.__version__} lacks {missing} (has {sorted(available)}); "
                      f"falling back to the rest. For CUDA: pip install onnxruntime-gpu", RuntimeWarning,
                      stacklevel=3)
    return [p for p in requested if p in available and p != CPU] + [CPU]


class PartSession:
    """One part's InferenceSession; casts float inputs to the dtypes the manifest declares."""

    def __init__(self, ort, path: Path, spec: PartSpec, providers: list[str], options):
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
            raise _load_error(path, str(e).splitlines()[0]) from None
        self.spec = spec
        _check_names(path, "inputs", spec.inputs, self.session.get_inputs())
        _check_names(path, "outputs", spec.outputs, self.session.get_outputs())

    def cast(self, name: str, array: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(array, dtype=self.spec.input(name).np_dtype)

    def run(self, **inputs: np.ndarray) -> list[np.ndarray]:
        return self.session.run(None, {k: self.cast(k, v) for k, v in inputs.items()})


def _load_error(path: Path, message: str) -> UserError:
    """Name the file that is damaged: onnxruntime blames an initializer, not the external .data file."""
    if "External initializer" in message or "external data" in message.lower():
        data = sorted({*path.parent.glob(f"{path.name}.data*"), *path.parent.glob(f"{path.stem}*.data")})
        where = ", ".join(str(d) for d in data) or f"the external data of {path}"
        return UserError(f"{where}: truncated or damaged external weights of {path.name} "
                         f"({message.split(' : ')[-1]}); re-export it")
    return UserError(f"{path}: onnxruntime cannot load it ({message.split(' : ')[-1]}); re-export it")


def _check_names(path: Path, kind: str, declared, actual) -> None:
    want, got = {t.name for t in declared}, {t.name for t in actual}
    if want != got:
        raise UserError(f"{path}: {kind} {sorted(got)} do not match the manifest's {sorted(want)}; "
                        "re-run moe-export")


class OrtEngine:
    """runtime.engine.Engine over vision/projector/embed/decoder.onnx."""

    def __init__(self, engine_dir: str | Path, manifest: Manifest | None = None,
                 providers: Sequence[str] | None = None, threads: int | None = None, max_len: int | None = None):
        ort = import_onnxruntime()
        self.manifest = manifest if manifest is not None else Manifest.load(engine_dir)
        self.providers = resolve_providers(ort, providers)
        self.hidden_size = self.manifest.decoder.hidden_size
        self.sessions = {part: PartSession(ort, self.manifest.path(part), self.manifest.parts[part],
                                           self.providers, _options(ort, part, threads))
                         for part in ("vision", "projector", "embed", "decoder")}
        decoder = self.sessions["decoder"]
        max_len = max_len or self.manifest.decoder.max_positions
        if CUDA in decoder.session.get_providers():
            _warn_fp32_fused_on_cuda(self.manifest)
            self._decoder = OrtDeviceDecoder(ort, decoder, self.manifest, max_len, device="cuda")
        else:
            self._decoder = HostDecoder(ort, decoder, self.manifest, max_len)

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        (features,) = self.sessions["vision"].run(pixel_values=pixel_values)  # [N,P,Dv]
        (embeds,) = self.sessions["projector"].run(image_features=features)  # [N,P,H]
        return embeds.astype(np.float32, copy=False)

    def embed_tokens(self, token_ids: np.ndarray) -> np.ndarray:
        (embeds,) = self.sessions["embed"].run(input_ids=np.asarray(token_ids).reshape(1, -1))  # [1,S,H]
        return embeds[0].astype(np.float32, copy=False)

    def prefill(self, inputs_embeds: np.ndarray) -> np.ndarray:
        return self._decoder.step(inputs_embeds, reset=True)

    def decode(self, token_id: int) -> np.ndarray:
        return self._decoder.step(self.embed_tokens(np.array([token_id], dtype=np.int64)), reset=False)

    def extend(self, inputs_embeds: np.ndarray) -> np.ndarray:
        return self._decoder.step(inputs_embeds, reset=False)

    def keep(self, positions: int) -> None:
        self._decoder.keep(positions)

    def cached_kv(self) -> np.ndarray:
        """[L,2,KVH,n,D] the cached keys and values as stored (fused attention on the host: calibration reads
        them to choose an int8 cache's scales)."""
        if not isinstance(self._decoder, HostDecoder) or not isinstance(self._decoder.cache, SharedKVCache):
            raise ValueError("cached_kv() reads the host cache of a fused-attention decoder")
        return self._decoder.cache.cached()

    @property
    def cache_length(self) -> int:
        return self._decoder.length

    @property
    def max_len(self) -> int:
        return self._decoder.max_len

    def close(self) -> None:
        self.sessions.clear()
        self._decoder = None

    def __enter__(self) -> OrtEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _warn_fp32_fused_on_cuda(manifest: Manifest) -> None:
    if manifest.attention == "fused" and manifest.precision == "fp32":
        warnings.warn("GroupQueryAttention has CUDA kernels for fp16/bf16 only: in this fp32 export onnxruntime "
                      "runs it on the CPU and copies the KV cache across every step; export with --precision "
                      "fp16 for CUDA", RuntimeWarning, stacklevel=3)


def _options(ort, part: str, threads: int | None):
    options = ort.SessionOptions()
    # No spinning worker threads, the decoder's included: between ops and steps they burn the CPU share the
    # calling thread needs. moe-bench on the 2-core machines (shared with other jobs), decoder with 2 threads,
    # spinning vs not, interleaved processes: 3.6 vs 1.7 ms/token (1.5M-param MoE), 148 vs 106 ms/token (300M).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if part == "decoder":
        if threads:
            options.intra_op_num_threads = threads
        return options
    # The other parts run between decoder steps (embed) or once per request; the embedding Gather needs no pool.
    options.intra_op_num_threads = 1 if part == "embed" else (threads or 0)
    return options


class _DecoderBase:
    """Feeds decoder.onnx one step: [S,H] embeds after n cached positions -> logits [V] float32."""

    def __init__(self, part: PartSession, manifest: Manifest, max_len: int):
        self.part = part
        self.layers = manifest.decoder.num_layers
        self.shape = (manifest.decoder.num_kv_heads, manifest.decoder.head_dim)
        self.cache_dtype = part.spec.input("past_key_values.0.key").np_dtype
        self.max_len = max_len
        # fused attention (GroupQueryAttention) takes one buffer as past and present and writes it in place
        self.shared_cache = manifest.attention == "fused"

    def step_inputs(self, embeds: np.ndarray, past: int) -> dict[str, np.ndarray]:
        s = embeds.shape[0]
        return {
            "inputs_embeds": self.part.cast("inputs_embeds", embeds[None]),  # [1,S,H]
            "attention_mask": np.ones((1, past + s), dtype=np.int64),  # [1,n+S]
            "position_ids": np.arange(past, past + s, dtype=np.int64)[None],  # [1,S]
        }


# Fused attention takes a long prompt in pieces of this many positions, each attending to the cache written
# by the ones before: onnxruntime's CPU GroupQueryAttention computes a prompt's whole square of scores, so one
# 700-position run costs 26 ms per layer on `small` against 13 ms in pieces of 256 (int8 cache: 57 / 35 ms).
# The whole `small` prefill of 700: fp32 cache 300 vs 320 ms, int8 cache 389 vs 448 ms (CPU time, medians of
# 5; smaller pieces lose more to per-run overhead than the attention saves: 64 -> 401 / 462 ms).
PROMPT_CHUNK = 256


class HostDecoder(_DecoderBase):
    """CPU path: past and present live in a preallocated cache (runtime/kv_cache.py), bound with IOBinding.

    Fused attention: the cache buffers move only when the cache grows (SharedKVCache.reserve) and the logits
    buffer never, so they are bound then and a step binds only its three small inputs (rebinding 2L + 1
    buffers cost ~0.1 ms a step on the demo model).
    Unfused: past and present are views that change with the cached length, so each step binds them anew.
    A fused prompt runs in PROMPT_CHUNK pieces (the logits of the last piece are the prompt's).
    """

    def __init__(self, ort, part: PartSession, manifest: Manifest, max_len: int):
        super().__init__(part, manifest, max_len)
        cache = SharedKVCache if self.shared_cache else KVCache
        self.cache = cache(self.layers, *self.shape, max_len, self.cache_dtype)
        logits_spec = part.spec.output("logits")
        self.logits = np.empty((1, manifest.decoder.vocab_size), logits_spec.np_dtype)  # [1,V]
        self._binding = self._bind_cache(0) if self.shared_cache else None

    @property
    def length(self) -> int:
        return self.cache.length

    def keep(self, positions: int) -> None:
        self.cache.keep(positions)

    def step(self, embeds: np.ndarray, reset: bool) -> np.ndarray:
        if reset:
            self.cache.reset()
        s = embeds.shape[0]
        self.cache.check_room(s)
        chunk = PROMPT_CHUNK if self.shared_cache else max(s, 1)
        for piece in [embeds[i:i + chunk] for i in range(0, s, chunk)] or [embeds]:
            logits = self._run(piece)
        return logits

    def _run(self, embeds: np.ndarray) -> np.ndarray:
        s = embeds.shape[0]
        if self.shared_cache and self.cache.reserve(s):
            self._binding = self._bind_cache(0)
        binding = self._binding if self._binding is not None else self._bind_cache(s)
        for name, array in self.step_inputs(embeds, self.cache.length).items():
            binding.bind_cpu_input(name, array)  # the binding holds each array until it is rebound
        self.part.session.run_with_iobinding(binding)
        self.cache.commit(s)
        return self.logits[0].astype(np.float32)  # a copy: the buffer is reused next step

    def _bind_cache(self, new_tokens: int):
        """A binding with the logits and every layer's past and present (for a step of new_tokens) bound."""
        binding = self.part.session.io_binding()
        _bind_array_output(binding, "logits", self.logits)
        for i in range(self.layers):
            for k, kind in enumerate(KINDS):
                binding.bind_cpu_input(f"past_key_values.{i}.{kind}", self.cache.past(i, k))
                _bind_array_output(binding, f"present.{i}.{kind}", self.cache.present_buffer(i, k, new_tokens))
        return binding


def _bind_array_output(binding, name: str, array: np.ndarray) -> None:
    binding.bind_output(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)


class OrtDeviceDecoder(_DecoderBase):
    """CUDA path: the cache stays on the device as OrtValues; only embeds, mask, positions go up and the logits
    come down per step. `device` may be "cpu" to exercise this path without a GPU.

    Fused attention: one [1,KVH,M,D] OrtValue per (layer, key|value), allocated once and bound as both past and
    present - the op writes the new positions in place. Unfused: onnxruntime allocates each present from its
    device arena and it is bound as the next step's past.
    """

    def __init__(self, ort, part: PartSession, manifest: Manifest, max_len: int, device: str = "cuda"):
        super().__init__(part, manifest, max_len)
        self.ort, self.device = ort, device
        self.length = 0
        # 2L OrtValues on the device, (key, value) per layer: [1,KVH,M,D] shared, else [1,KVH,n,D]
        self.past = self._device_cache(max_len if self.shared_cache else 0)

    def step(self, embeds: np.ndarray, reset: bool) -> np.ndarray:
        if reset:
            self.length = 0
            if not self.shared_cache:
                self.past = self._device_cache(0)
        s = embeds.shape[0]
        check_room(self.length, s, self.max_len)
        binding = self.part.session.io_binding()
        inputs = self.step_inputs(embeds, self.length)
        for name, array in inputs.items():
            binding.bind_cpu_input(name, array)
        names = [f"{i}.{kind}" for i in range(self.layers) for kind in KINDS]
        for name, value in zip(names, self.past):
            binding.bind_ortvalue_input(f"past_key_values.{name}", value)
        binding.bind_output("logits", self.device)
        for name, value in zip(names, self.past):
            if self.shared_cache:
                binding.bind_ortvalue_output(f"present.{name}", value)
            else:
                binding.bind_output(f"present.{name}", self.device)
        self.part.session.run_with_iobinding(binding)
        logits, *presents = binding.get_outputs()
        if not self.shared_cache:
            self.past = presents
        self.length += s
        return logits.numpy()[0].astype(np.float32)

    def keep(self, positions: int) -> None:
        """Drop every cached position after the first `positions`. Fused: the buffers stay, the length drops.
        Unfused: each [1,KVH,n,D] is cut to [1,KVH,positions,D] with one round trip through host memory per
        follow-up turn (OrtValue has no device-side slice), much less than prefilling the kept positions."""
        if not 0 <= positions <= self.length:
            raise ValueError(f"cannot keep {positions} of {self.length} cached positions")
        if positions < self.length and not self.shared_cache:
            self.past = [self.ort.OrtValue.ortvalue_from_numpy(
                np.ascontiguousarray(value.numpy()[:, :, :positions]), self.device, 0) for value in self.past]
        self.length = positions

    def _device_cache(self, positions: int) -> list:
        shape = [1, self.shape[0], positions, self.shape[1]]  # [1,KVH,positions,D]
        return [self.ort.OrtValue.ortvalue_from_shape_and_type(shape, self.cache_dtype, self.device, 0)
                for _ in range(2 * self.layers)]
