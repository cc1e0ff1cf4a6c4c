"""The OpenAI chat-completions wire format: request validation (pydantic), response and chunk bodies, errors.

Field ranges follow the OpenAI API where it defines them; top_k and repetition_penalty are the common
extensions (vLLM, llama.cpp's server). Unknown request fields are ignored, as the OpenAI API does.
"""
from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from runtime.generation import GenerationResult


class ImageURL(BaseModel):
    url: str


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL | str


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # the newer name of max_tokens
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)  # greedy unless asked, as moe-run
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=1)  # one engine, one answer per request

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


def error_body(message: str, kind: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(result: GenerationResult) -> dict:
    completion = len(result.token_ids)
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": completion,
            "total_tokens": result.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": result.cached_tokens}}


def completion_body(cid: str, model: str, result: GenerationResult) -> dict:
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "finish_reason": result.finish_reason.value, "logprobs": None}],
            "usage": usage(result)}


def chunk_body(cid: str, model: str, delta: dict, finish_reason: str | None = None,
               result: GenerationResult | None = None) -> dict:
    """One server-sent event's data. With `result`, the usage-only chunk (choices empty) that
    stream_options.include_usage asks for."""
    body = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
    if result is not None:
        return {**body, "choices": [], "usage": usage(result)}
    return {**body, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}
