"""The interface the generation loop drives: one image-text request at a time (batch 1), numpy in and out.

Shapes: N images, P visual tokens per image, S tokens, H hidden size, V vocabulary.
Implemented by runtime.ort_engine.OrtEngine (ONNX Runtime), the TensorRT engine and the PyTorch model's
adapter elsewhere; runtime.generation.Pipeline depends on nothing else.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Engine(Protocol):
    hidden_size: int

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        """[N,3,h,w] float32 -> [N,P,H] float32 visual tokens (vision tower + projector)."""
        ...

    def embed_tokens(self, token_ids: np.ndarray) -> np.ndarray:
        """[S] int64 -> [S,H] float32."""
        ...

    def prefill(self, inputs_embeds: np.ndarray) -> np.ndarray:
        """[S,H] -> logits [V] float32 of the last position; starts a new KV cache."""
        ...

    def decode(self, token_id: int) -> np.ndarray:
        """-> logits [V] float32 of the next position; appends token_id to the KV cache."""
        ...

    def close(self) -> None:
        ...


@runtime_checkable
class ContextLimited(Protocol):
    """An engine that says how many positions (prompt + answer) its KV cache holds; the loop then ends an answer
    that reaches it with finish reason "length" instead of failing."""
    max_len: int


@runtime_checkable
class PrefixCaching(Protocol):
    """An engine that keeps its KV cache between requests, so a follow-up turn prefills only what is new."""
    cache_length: int  # positions cached now

    def keep(self, positions: int) -> None:
        """Drop every cached position from `positions` on (0 <= positions <= cache_length)."""
        ...

    def extend(self, inputs_embeds: np.ndarray) -> np.ndarray:
        """[S,H] appended after the cached positions -> logits [V] float32 of the last one."""
        ...
