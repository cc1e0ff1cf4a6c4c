"""The FastAPI application: /v1/chat/completions (streamed or not), /v1/models, /health; OpenAI-style errors.

Every failure a client can cause answers 4xx with {"error": {"message", "type", "param", "code"}} and leaves
the server serving; a full queue answers 429.
"""
from __future__ import annotations

import json
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from runtime.errors import UserError
from runtime.generation import Pipeline
from runtime.serve.chat import conversation
from runtime.serve.images import ImagePolicy
from runtime.serve.protocol import ChatRequest, chunk_body, completion_body, completion_id, error_body
from runtime.serve.worker import EventKind, Job, QueueFull, Worker
from runtime.settings import GenerationSettings

DEFAULT_MAX_TOKENS = 512  # when neither the request nor the engine bounds the answer
ERROR_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 429: "server_busy",
               500: "server_error", 503: "server_error", 504: "timeout"}


@dataclass(frozen=True)
class ServerConfig:
    model_name: str
    images: ImagePolicy = field(default_factory=ImagePolicy)
    max_queue: int = 16  # requests waiting behind the one being answered
    request_timeout_s: float = 300.0  # from arrival to the last token


def error_response(status: int, message: str, code: str | None = None, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, ERROR_TYPES.get(status, "invalid_request_error"), code, param),
                        status_code=status)


def settings_for(body: ChatRequest, max_len: int | None) -> GenerationSettings:
    return GenerationSettings(
        max_new_tokens=body.max_completion_tokens or body.max_tokens or max_len or DEFAULT_MAX_TOKENS,
        temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
        repetition_penalty=body.repetition_penalty, frequency_penalty=body.frequency_penalty,
        presence_penalty=body.presence_penalty, stop=body.stop_strings, seed=body.seed)


def create_app(pipeline: Pipeline, config: ServerConfig) -> FastAPI:
    worker = Worker(pipeline, config.max_queue, config.request_timeout_s)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="moe-serve", lifespan=lifespan)
    app.state.worker, app.state.pipeline = worker, pipeline
    add_error_handlers(app)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": config.model_name, "busy": worker.busy, "queued": worker.jobs.qsize(),
                "prefix_reuse": pipeline.reuses_prefix, **asdict(worker.stats)}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                            "owned_by": "moe-llava-edge"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        if body.model != config.model_name:
            return error_response(404, f"model {body.model!r} does not exist; this server serves "
                                       f"{config.model_name!r} (GET /v1/models)", "model_not_found", "model")
        try:
            turns, image = await run_in_threadpool(conversation, body.messages, config.images)
            job = worker.submit(turns, image, settings_for(body, pipeline.max_len))
        except UserError as e:
            return error_response(400, str(e))
        except QueueFull as e:
            return error_response(429, str(e), "queue_full")
        return await answer(job, body, config.model_name)

    return app


async def answer(job: Job, body: ChatRequest, model: str):
    """Wait for the first event, so that an error found before the first token is still an HTTP status."""
    try:
        first = await job.events.get()
    except BaseException:
        job.cancelled.set()
        raise
    if first[0] is EventKind.ERROR:
        return error_response(*first[1])
    cid = completion_id()
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(sse_events(job, first, cid, model, usage), media_type="text/event-stream")
    try:
        event = first
        while event[0] is EventKind.PIECE:
            event = await job.events.get()
    finally:
        job.cancelled.set()  # a no-op once the job is done; stops it when this handler is cancelled
    if event[0] is EventKind.ERROR:
        return error_response(*event[1])
    return completion_body(cid, model, event[1])


async def sse_events(job: Job, event, cid: str, model: str, include_usage: bool):
    """Server-sent events: a role chunk, content chunks, a finish chunk, [usage chunk,] [DONE]. A client that
    disconnects cancels this generator, and with it the job."""
    try:
        yield sse(chunk_body(cid, model, {"role": "assistant", "content": ""}))
        while event[0] is EventKind.PIECE:
            yield sse(chunk_body(cid, model, {"content": event[1]}))
            event = await job.events.get()
        if event[0] is EventKind.ERROR:
            status, message = event[1]
            yield sse(error_body(message, ERROR_TYPES.get(status, "server_error")))
        else:
            result = event[1]
            yield sse(chunk_body(cid, model, {}, result.finish_reason.value))
            if include_usage:
                yield sse(chunk_body(cid, model, {}, result=result))
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()


def sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            return error_response(400, f"the request body is not valid JSON: {first.get('msg')}", "invalid_json")
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or "the request body"
        count = len(exc.errors())
        more = f" (and {count - 1} more problem{'s' if count > 2 else ''})" if count > 1 else ""
        return error_response(400, f"{where}: {first.get('msg')}{more}", "invalid_value", where)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error"), status_code=exc.status_code)
