"""moe-serve through the official openai client, against a live server on 127.0.0.1 over the tiny export:
answers equal the Python API's, streaming equals non-streaming, and a follow-up turn reuses the KV cache."""
from __future__ import annotations

import numpy as np
import pytest

openai = pytest.importorskip("openai")  # the dev extra; the server itself needs only fastapi + uvicorn

from rt_helpers import build_tiny_export  # noqa: E402
from runtime.pipeline import load_pipeline  # noqa: E402
from runtime.prompt import Turn  # noqa: E402
from runtime.settings import FinishReason, GenerationSettings  # noqa: E402
from serve_helpers import MODEL, SpyEngine, data_url, get, image_message, live_server, png_bytes  # noqa: E402


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    build_tiny_export(out, np.float32)
    return out


@pytest.fixture(scope="module")
def server(export_dir):
    pipeline = load_pipeline(export_dir)
    pipeline.engine = SpyEngine(pipeline.engine)
    with pipeline, live_server(pipeline) as url:
        yield url, pipeline


@pytest.fixture(scope="module")
def reference(export_dir):
    """The Python API on its own engine, every prompt prefilled in full: what the server must answer."""
    with load_pipeline(export_dir) as pipeline:
        pipeline.reuses_prefix = False
        yield pipeline


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def fresh_answer(pipeline, turns, image=None, **settings):
    return pipeline.chat(turns, image, GenerationSettings(**settings))


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = get(server[0] + "/health")
    assert health["status"] == "ok" and health["prefix_reuse"] is True


def test_text_answer_equals_the_python_api(client, reference):
    response = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}],
                                              max_tokens=12)
    want = fresh_answer(reference, [Turn("Hello")], max_new_tokens=12)
    choice = response.choices[0]
    assert choice.message.content == want.text and choice.finish_reason == want.finish_reason.value
    assert response.usage.prompt_tokens == want.prompt_tokens
    assert response.usage.completion_tokens == len(want.token_ids)


def test_streaming_with_an_image_equals_non_streaming(client, reference):
    image = png_bytes()
    messages = [image_message("What is this?", data_url(image))]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    want = fresh_answer(reference, [Turn("<image>\nWhat is this?")], image, max_new_tokens=10)
    assert text == whole.choices[0].message.content == want.text
    assert finishes == [want.finish_reason.value]
    assert chunks[-1].usage.prompt_tokens == want.prompt_tokens == whole.usage.prompt_tokens


def test_follow_up_turn_reuses_the_cache_and_answers_as_a_fresh_prefill(server, client, reference):
    spy: SpyEngine = server[1].engine
    image = png_bytes(seed=5)
    first_messages = [image_message("Describe it.", data_url(image))]
    first = client.chat.completions.create(model=MODEL, messages=first_messages, max_tokens=8)
    answer = first.choices[0].message.content
    spy.calls.clear()
    follow_up = first_messages + [{"role": "assistant", "content": answer},
                                  {"role": "user", "content": "And the colours?"}]
    second = client.chat.completions.create(model=MODEL, messages=follow_up, max_tokens=8)

    usage = second.usage
    cached = usage.prompt_tokens_details.cached_tokens
    assert cached > first.usage.prompt_tokens - 1  # the whole first prompt (and more) was reused
    assert spy.calls == [("extend", usage.prompt_tokens - cached)]  # no image encode, only new positions
    turns = [Turn("<image>\nDescribe it.", answer), Turn("And the colours?")]
    want = fresh_answer(reference, turns, image, max_new_tokens=8)
    assert want.cached_tokens == 0 and want.prompt_tokens == usage.prompt_tokens
    assert second.choices[0].message.content == want.text


def test_generation_controls_reach_the_engine(client, reference):
    messages = [{"role": "user", "content": "Count"}]
    base = fresh_answer(reference, [Turn("Count")], max_new_tokens=12)
    assert base.finish_reason is FinishReason.LENGTH and len(base.text) >= 6
    stop = base.text[3:5]
    cut = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, stop=[stop])
    assert cut.choices[0].message.content == base.text[:base.text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    sampled = [client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=1.5,
                                              seed=seed, extra_body={"top_k": 5}).choices[0].message.content
               for seed in (3, 3, 4)]
    assert sampled[0] == sampled[1] != sampled[2]
