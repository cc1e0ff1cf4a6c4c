"""What a caller may ask of one generation: length, sampling, penalties, stop strings, seed; and why it ended.

One typed record shared by the Python API, `moe-run` flags and the server's request body, checked in one place.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

from runtime.errors import UserError

MAX_STOP_STRINGS = 4  # the OpenAI API's limit


class FinishReason(str, Enum):
    STOP = "stop"      # the end token or a stop string
    LENGTH = "length"  # max_new_tokens, or the model's context is full


@dataclass(frozen=True)
class GenerationSettings:
    """temperature 0 is greedy. top_k 0 and top_p 1 keep every token. repetition_penalty (transformers'
    definition, 1 = off) divides positive / multiplies negative logits of every token already in the context;
    frequency_penalty and presence_penalty (OpenAI's definitions, 0 = off) subtract count * f + (count > 0) * p
    from the logits of tokens already generated. seed None draws a fresh one."""
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: tuple[str, ...] = field(default_factory=tuple)
    seed: int | None = 0

    def __post_init__(self):
        object.__setattr__(self, "stop", tuple(self.stop))
        self.check()

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    def check(self) -> None:
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            raise UserError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens}")
        check_sampling_args(self.temperature, self.top_p)
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise UserError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise UserError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise UserError(f"{name} must be in [-2, 2] (0 = off), got {value}")
        if len(self.stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in self.stop):
            raise UserError(f"stop takes at most {MAX_STOP_STRINGS} non-empty strings, got {list(self.stop)}")


def check_sampling_args(temperature: float, top_p: float) -> None:
    if not temperature >= 0.0 or math.isinf(temperature):
        raise UserError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise UserError(f"top_p must be in (0, 1], got {top_p}")
