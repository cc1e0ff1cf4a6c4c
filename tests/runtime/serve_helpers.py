"""A live moe-serve on 127.0.0.1 (a free port, in this process) over the tiny export, and engine wrappers
that make generation slow or hold it, for the queue, cancel and timeout tests."""
from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

import numpy as np
from PIL import Image

from runtime.serve.app import ServerConfig, create_app

MODEL = "tiny"


@contextmanager
def live_server(pipeline, config: ServerConfig | None = None):
    """Yields the base URL; the server is shut down (and its worker joined) on exit."""
    import uvicorn

    app = create_app(pipeline, config or ServerConfig(MODEL))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="error", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()


def post(url: str, body: bytes | dict, timeout: float = 30) -> tuple[int, dict]:
    """Raw POST (the openai client refuses to send malformed bodies): (status, JSON body)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def png_bytes(size=(13, 9), seed=0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_message(text: str, url: str) -> dict:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                        {"type": "text", "text": text}]}


class SpyEngine:
    """Delegates to an engine; records extend/prefill sizes and image encodes; decode can be slowed or held."""

    def __init__(self, engine, decode_delay_s: float = 0.0):
        self._engine = engine
        self.decode_delay_s = decode_delay_s
        self.gate = threading.Event()
        self.gate.set()
        self.calls: list[tuple[str, int]] = []  # ("prefill" | "extend" | "encode", rows)

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def encode_images(self, pixel_values):
        self.calls.append(("encode", pixel_values.shape[0]))
        return self._engine.encode_images(pixel_values)

    def prefill(self, embeds):
        self.calls.append(("prefill", embeds.shape[0]))
        return self._engine.prefill(embeds)

    def extend(self, embeds):
        self.calls.append(("extend", embeds.shape[0]))
        return self._engine.extend(embeds)

    def keep(self, positions):
        self._engine.keep(positions)

    def decode(self, token_id):
        self.gate.wait(timeout=30)
        time.sleep(self.decode_delay_s)
        return self._engine.decode(token_id)
