"""moe-serve under bad input and load: every client mistake is a 4xx with an OpenAI-style error body and the
server keeps serving; a full queue is a 429; a client that leaves mid-stream stops its generation; a request
past its time limit is a 504."""
from __future__ import annotations

import http.server
import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

openai = pytest.importorskip("openai")

from rt_helpers import build_tiny_export  # noqa: E402
from runtime.pipeline import load_pipeline  # noqa: E402
from runtime.serve.app import ServerConfig  # noqa: E402
from runtime.serve.images import ImagePolicy  # noqa: E402
from serve_helpers import (MODEL, SpyEngine, data_url, get, image_message, live_server, png_bytes,  # noqa: E402
                           post)

CONTEXT = 512  # the tiny export's max_positions


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    build_tiny_export(out, np.float32, max_positions=CONTEXT)
    return out


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    (root / "ok.png").write_bytes(png_bytes())
    return root


@pytest.fixture(scope="module")
def server(export_dir, image_root):
    with load_pipeline(export_dir) as pipeline, \
            live_server(pipeline, ServerConfig(MODEL, ImagePolicy(root=image_root, max_bytes=4096))) as url:
        yield url


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **fields}


def truncated_png() -> bytes:
    data = png_bytes((40, 40))
    return data[:len(data) // 2]


BAD_REQUESTS = {
    "malformed JSON": (b'{"model": "tiny", "messages": [', 400, "not valid JSON"),
    "not an object": (b'[1, 2]', 400, "request body"),
    "unknown model": (chat(model="gpt-4o"), 404, "does not exist"),
    "no messages": (chat(messages=[]), 400, "messages"),
    "bad base64": (chat(messages=[image_message("q", "data:image/png;base64,@@@not base64@@@")]), 400, "base64"),
    "not a data URL": (chat(messages=[image_message("q", "data:image/png,rawbytes")]), 400, "base64"),
    "not an image": (chat(messages=[image_message("q", data_url(b"just some text"))]), 400, "cannot read"),
    "truncated image": (chat(messages=[image_message("q", data_url(truncated_png()))]), 400, "truncated"),
    "image over the size limit": (chat(messages=[image_message("q", data_url(bytes(8000)))]), 400, "limit"),
    "two images": (chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(png_bytes())}},
        {"type": "image_url", "image_url": {"url": data_url(png_bytes(seed=1))}}]}]), 400, "one image"),
    "prompt longer than the context": (chat(messages=[{"role": "user", "content": "x" * CONTEXT}]), 400,
                                       "context holds 512"),
    "temperature out of range": (chat(temperature=2.5), 400, "temperature"),
    "top_p zero": (chat(top_p=0), 400, "top_p"),
    "max_tokens zero": (chat(max_tokens=0), 400, "max_tokens"),
    "negative top_k": (chat(top_k=-1), 400, "top_k"),
    "frequency_penalty out of range": (chat(frequency_penalty=3), 400, "frequency_penalty"),
    "n > 1": (chat(n=2), 400, "n"),
    "five stop strings": (chat(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    "unknown content part": (chat(messages=[{"role": "user", "content": [{"type": "audio", "x": 1}]}]), 400,
                             "messages"),
    "system message": (chat(messages=[{"role": "system", "content": "be brief"},
                                      {"role": "user", "content": "Hi"}]), 400, "system"),
    "assistant last": (chat(messages=[{"role": "user", "content": "Hi"},
                                      {"role": "assistant", "content": "Hello"}]), 400, "last message"),
    "file outside the image root": (chat(messages=[image_message("q", "file:///etc/hostname")]), 400,
                                    "outside"),
    "missing file": (chat(messages=[image_message("q", "nope.png")]), 400, "not found"),
    "http fetch disabled": (chat(messages=[image_message("q", "http://127.0.0.1:9/x.png")]), 400,
                            "--allow-http-images"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=list(BAD_REQUESTS))
def test_bad_input_is_a_4xx_with_an_openai_error_and_the_server_keeps_serving(server, case):
    body, status, words = BAD_REQUESTS[case]
    got_status, got = post(server + "/v1/chat/completions", body)
    assert got_status == status
    assert set(got["error"]) == {"message", "type", "param", "code"}
    assert words in got["error"]["message"]
    ok_status, ok = post(server + "/v1/chat/completions", chat())
    assert ok_status == 200 and ok["choices"][0]["message"]["role"] == "assistant"


def test_decompression_bomb_is_refused(server, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # a 40x40 image is then a 16x "bomb"
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), (9, 9, 9)).save(buffer, format="PNG")  # small file, many pixels
    status, body = post(server + "/v1/chat/completions",
                        chat(messages=[image_message("q", data_url(buffer.getvalue()))]))
    assert status == 400 and "decompression bomb" in body["error"]["message"]


def test_local_file_under_the_image_root(server):
    status, body = post(server + "/v1/chat/completions", chat(messages=[image_message("q", "ok.png")]))
    assert status == 200 and body["usage"]["prompt_tokens"] > 4


def test_http_images_when_enabled_obey_the_size_limit(export_dir, image_root):
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(image_root))  # noqa: E731
    (image_root / "big.png").write_bytes(png_bytes((200, 200)))
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{files.server_address[1]}"
    policy = ImagePolicy(allow_http=True, max_bytes=8192, http_timeout_s=5)
    try:
        with load_pipeline(export_dir) as pipeline, live_server(pipeline, ServerConfig(MODEL, policy)) as url:
            ok = post(url + "/v1/chat/completions", chat(messages=[image_message("q", base + "/ok.png")]))
            big = post(url + "/v1/chat/completions", chat(messages=[image_message("q", base + "/big.png")]))
    finally:
        files.shutdown()
    assert ok[0] == 200
    assert big[0] == 400 and "larger than" in big[1]["error"]["message"]


@pytest.fixture
def slow_server(export_dir):
    """One slot in the queue, 20 ms per decoded token, and a gate that holds decoding."""
    with load_pipeline(export_dir) as pipeline:
        pipeline.engine = SpyEngine(pipeline.engine, decode_delay_s=0.02)
        with live_server(pipeline, ServerConfig(MODEL, max_queue=1, request_timeout_s=30)) as url:
            yield url, pipeline.engine


def wait_for(predicate, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def test_full_queue_answers_429_and_the_queued_request_is_served(slow_server):
    url, spy = slow_server
    spy.gate.clear()
    results = {}

    def send(name):
        results[name] = post(url + "/v1/chat/completions", chat(max_tokens=3))

    threads = [threading.Thread(target=send, args=(name,)) for name in ("running", "queued")]
    threads[0].start()
    wait_for(lambda: get(url + "/health")["busy"])
    threads[1].start()
    wait_for(lambda: get(url + "/health")["queued"] == 1)
    status, body = post(url + "/v1/chat/completions", chat())
    spy.gate.set()
    for t in threads:
        t.join(timeout=20)
    assert status == 429 and body["error"]["code"] == "queue_full" and "retry" in body["error"]["message"]
    assert results["running"][0] == results["queued"][0] == 200


def test_client_leaving_mid_stream_cancels_its_generation(slow_server):
    url, spy = slow_server
    with openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as client:
        stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=400, stream=True)
        next(iter(stream))
        stream.close()
    wait_for(lambda: get(url + "/health")["cancelled"] == 1)
    calls_before = len(spy.calls)
    health = get(url + "/health")
    assert health["served"] == 0 and not health["busy"]
    # and the server answers the next request (400 tokens at 20 ms would have taken 8 s)
    status, body = post(url + "/v1/chat/completions", chat(max_tokens=2))
    assert status == 200 and len(spy.calls) == calls_before + 1  # one more prefill/extend


def test_request_past_its_time_limit_is_a_504(export_dir):
    with load_pipeline(export_dir) as pipeline:
        pipeline.engine = SpyEngine(pipeline.engine, decode_delay_s=0.02)
        with live_server(pipeline, ServerConfig(MODEL, request_timeout_s=0.3)) as url:
            status, body = post(url + "/v1/chat/completions", chat(max_tokens=200))
            assert status == 504 and "limit of 0.3 s" in body["error"]["message"]
            assert get(url + "/health")["timed_out"] == 1


@pytest.mark.parametrize("args, words", [(["--engine-dir", "{missing}"], "does not exist"),
                                         (["--engine-dir", "{export}", "--image-root", "{missing}"],
                                          "not a directory"),
                                         (["--engine-dir", "{export}", "--max-queue", "0"], "--max-queue")])
def test_moe_serve_bad_flags_are_one_error_line(export_dir, tmp_path, capsys, args, words):
    import cli
    argv = [a.format(missing=tmp_path / "nope", export=export_dir) for a in args]
    code = cli.serve_main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error:") and words in err
