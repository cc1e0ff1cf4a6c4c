"""The engine capability behind multi-turn reuse: keep(n) rolls the KV cache back to n positions and
extend(embeds) appends to it, so that logits equal a fresh prefill of the same positions. Checked on the tiny
export (its logits are a closed-form function of everything cached; see rt_helpers) for the host decoder and
the device decoder's OrtValue path, on the fused-attention variant (fused_tiny: one shared buffer, bound once),
and for the Pipeline's bookkeeping of what the cache holds, including what a changed image or message undoes."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

ort = pytest.importorskip("onnxruntime")

from fused_tiny import build_fused_tiny_export, fused_expected_logits  # noqa: E402
from rt_helpers import EOS, TINY_SPEC, FakeEngine, build_tiny_export, byte_tokenizer, expected_logits  # noqa: E402
from runtime.engine import PrefixCaching  # noqa: E402
from runtime.errors import UserError  # noqa: E402
from runtime.generation import Pipeline  # noqa: E402
from runtime.kv_cache import KVCache  # noqa: E402
from runtime.ort_engine import HostDecoder, OrtDeviceDecoder, OrtEngine  # noqa: E402
from runtime.pipeline import load_pipeline  # noqa: E402
from runtime.prefix_cache import PrefixCache  # noqa: E402
from runtime.prompt import Turn  # noqa: E402
from runtime.settings import GenerationSettings  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    return out, build_tiny_export(out, np.float32)


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    out = tmp_path_factory.mktemp("fused")
    return out, build_fused_tiny_export(out)


def test_kv_cache_keep_keeps_exactly_the_first_positions():
    cache = KVCache(num_layers=2, num_kv_heads=3, head_dim=4, max_len=16, dtype=np.float32)
    rng = np.random.default_rng(0)
    for new in (5, 1, 2):  # prefill 5, then two steps
        for layer in range(2):
            for kind in range(2):
                present = cache.present_buffer(layer, kind, new)
                present[:, :, :cache.length] = cache.past(layer, kind)
                present[:, :, cache.length:] = rng.standard_normal((1, 3, new, 4))
        cache.commit(new)
    before = [cache.past(layer, kind).copy() for layer in range(2) for kind in range(2)]
    cache.keep(6)
    after = [cache.past(layer, kind) for layer in range(2) for kind in range(2)]
    assert cache.length == 6
    for old, new in zip(before, after):
        np.testing.assert_array_equal(new, old[:, :, :6])
    with pytest.raises(ValueError):
        cache.keep(7)


@pytest.mark.parametrize("device_path", [False, True])
def test_keep_then_extend_equals_a_fresh_prefill(tiny, device_path):
    out, weights = tiny
    with OrtEngine(out) as engine:
        if device_path:
            engine._decoder = OrtDeviceDecoder(ort, engine.sessions["decoder"], engine.manifest, 64, device="cpu")
        assert isinstance(engine, PrefixCaching)
        first, later = [5, 17, 99, 3, 8], [40, 41]
        engine.prefill(engine.embed_tokens(np.array(first, np.int64)))
        for token in (7, 9, 11):
            engine.decode(token)
        engine.keep(4)
        assert engine.cache_length == 4
        logits = engine.extend(engine.embed_tokens(np.array(later, np.int64)))
        assert engine.cache_length == 6
        np.testing.assert_allclose(logits, expected_logits(weights["table"][first[:4] + later], weights),
                                   rtol=1e-5, atol=1e-5)


def test_fused_decoder_bound_once_steps_keeps_and_extends_like_the_reference(fused):
    """The shared buffers and logits are bound once; every step rebinds only its inputs. Each logits vector,
    across prefills of different lengths, decode steps, a rollback and a second prefill, equals the attention
    of the positions it should see, computed in numpy."""
    out, weights = fused
    table = weights["table"]
    with OrtEngine(out) as engine:
        assert isinstance(engine._decoder, HostDecoder) and engine._decoder.shared_cache
        first, later = [5, 17, 99, 3, 8], [40, 41]
        got = [engine.prefill(engine.embed_tokens(np.array(first, np.int64)))]
        want = [fused_expected_logits(table[first], weights)]
        for i, token in enumerate((7, 9, 11)):
            got.append(engine.decode(token))
            want.append(fused_expected_logits(table[first + [7, 9, 11][:i + 1]], weights))
        engine.keep(4)
        got.append(engine.extend(engine.embed_tokens(np.array(later, np.int64))))
        want.append(fused_expected_logits(table[first[:4] + later], weights))
        assert engine.cache_length == 6
        got.append(engine.prefill(engine.embed_tokens(np.array(later, np.int64))))
        want.append(fused_expected_logits(table[later], weights))
    for g, w in zip(got, want):  # float32 attention over a handful of positions vs float64
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prompt_chunk", [256, 2])
def test_fused_cache_grows_as_it_fills_and_keeps_what_it_holds(fused, monkeypatch, prompt_chunk):
    """The shared buffer starts at one grain and grows (x1.5, whole grains, capped at the context) only when a
    step needs room; every logits vector across the moves equals the numpy attention of the cached positions,
    so the copy kept every cached position and the step after a move ran on the rebound buffers. With
    prompt_chunk 2 the prefill and the 4-position extend run in pieces of 2 positions: the same logits."""
    import runtime.ort_engine
    from runtime.kv_cache import SharedKVCache
    monkeypatch.setattr(SharedKVCache, "GRAIN", 4)
    monkeypatch.setattr(runtime.ort_engine, "PROMPT_CHUNK", prompt_chunk)
    out, weights = fused
    table = weights["table"]
    with OrtEngine(out, max_len=14) as engine:
        cache = engine._decoder.cache
        assert cache.capacity == 4
        tokens = [5, 17, 99]
        got, want, capacities = [engine.prefill(engine.embed_tokens(np.array(tokens, np.int64)))], [], [4]
        want.append(fused_expected_logits(table[tokens], weights))
        for token in (7, 9, 11, 2, 4, 6):  # positions 4..9: grows to 8, then to 12
            got.append(engine.decode(token))
            tokens.append(token)
            want.append(fused_expected_logits(table[tokens], weights))
            capacities.append(cache.capacity)
        assert capacities == [4, 4, 8, 8, 8, 8, 12]
        got.append(engine.extend(engine.embed_tokens(np.array([3, 8, 1, 40], np.int64))))  # 13 > 12: capped at 14
        tokens += [3, 8, 1, 40]
        want.append(fused_expected_logits(table[tokens], weights))
        assert cache.capacity == 14 and engine.cache_length == 13
        with pytest.raises(UserError, match="context full"):
            engine.extend(engine.embed_tokens(np.array([1, 2], np.int64)))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_prefix_cache_counts_the_image_slot_as_its_visual_positions():
    cache = PrefixCache([1, 2, "img", 3, 4], visual_tokens=6)
    assert cache.positions(2) == 2 and cache.positions(4) == 9
    assert cache.reusable([1, 2, "img", 3, 9, 9]) == 4
    assert cache.reusable([1, 2, "other", 3]) == 2
    assert cache.reusable([1, 2, "img", 3, 4]) == 4  # a resent prompt still prefills its last key


@pytest.mark.parametrize("export", ["tiny", "fused"])
def test_pipeline_follow_up_prefills_only_the_new_positions(export, request):
    out, _ = request.getfixturevalue(export)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (9, 13, 3), dtype=np.uint8))
    settings = GenerationSettings(max_new_tokens=6)
    with load_pipeline(out) as pipe, load_pipeline(out) as fresh:
        fresh.reuses_prefix = False
        first = pipe.chat([Turn("Describe.")], image, settings)
        turns = [Turn("<image>\nDescribe.", first.text), Turn("More?")]
        second = pipe.chat(turns, image, settings)
        want = fresh.chat(turns, image, settings)
    assert second.cached_tokens >= first.prompt_tokens and want.cached_tokens == 0
    assert second.prompt_tokens == want.prompt_tokens and second.token_ids == want.token_ids


def test_an_engine_without_the_capability_prefills_every_turn():
    engine = FakeEngine([EOS])
    pipe = Pipeline(engine, byte_tokenizer(), "stablelm", TINY_SPEC, eos_token_id=EOS)
    pipe.chat([Turn("a")])
    result = pipe.chat([Turn("a", ""), Turn("b")])
    assert not pipe.reuses_prefix and result.cached_tokens == 0 and len(engine.prefill_inputs) == 2


def test_image_prompt_over_the_context_fails_before_the_image_is_encoded(tiny):
    out, _ = tiny
    image = Image.new("RGB", (8, 8), (1, 2, 3))
    with load_pipeline(out) as probe:
        needed = len(probe.prompt_ids("q", with_image=True)) - 1 + 4  # text + P=4 visual positions
    with load_pipeline(out, max_len=needed - 1) as pipe:
        encoded = []
        pipe.engine.encode_images = lambda pixels: encoded.append(pixels)
        with pytest.raises(UserError, match=f"needs {needed} positions"):
            pipe.generate(image, "q")
    assert encoded == []


def _follow_up_vs_fresh(out, image, after_turn_1, follow_up):
    """Turn 1 on `image`; after_turn_1(image) (may change it in place); the follow-up turns follow_up(answer 1)
    through the same pipeline, and again through a pipeline with reuse off.
    -> (follow-up result, fresh result, turn 1 result, images encoded by the follow-up)."""
    settings = GenerationSettings(max_new_tokens=6)
    with load_pipeline(out) as pipe, load_pipeline(out) as fresh:
        fresh.reuses_prefix = False
        first = pipe.chat([Turn("Describe.")], image, settings)
        after_turn_1(image)
        encoded, encode = [], pipe.engine.encode_images
        pipe.engine.encode_images = lambda pixels: encoded.append(pixels) or encode(pixels)
        turns = follow_up(first.text)
        second = pipe.chat(turns, image, settings)
        want = fresh.chat(turns, image, settings)
    return second, want, first, encoded


def _image():
    return Image.fromarray(np.random.default_rng(2).integers(0, 256, (9, 13, 3), dtype=np.uint8))


@pytest.mark.parametrize("export", ["tiny", "fused"])
def test_a_follow_up_with_the_image_changed_in_place_encodes_it_again(export, request):
    """The same PIL object with one pixel changed between the turns: the image and everything after it is
    prefilled again, and the answer is a fresh run's."""
    out, _ = request.getfixturevalue(export)
    image = _image()
    with load_pipeline(out) as probe:
        before_image = probe.prompt_ids("Describe.", with_image=True).index(-200)  # text positions
    second, want, _, encoded = _follow_up_vs_fresh(
        out, image, lambda img: img.putpixel((0, 0), tuple(255 - v for v in img.getpixel((0, 0)))),
        lambda answer: [Turn("<image>\nDescribe.", answer), Turn("More?")])
    assert len(encoded) == 1 and second.cached_tokens == before_image
    assert second.token_ids == want.token_ids and second.prompt_tokens == want.prompt_tokens


@pytest.mark.parametrize("export", ["tiny", "fused"])
def test_a_follow_up_with_an_earlier_message_changed_reuses_only_what_precedes_the_change(export, request):
    out, _ = request.getfixturevalue(export)
    second, want, first, encoded = _follow_up_vs_fresh(
        out, _image(), lambda img: None, lambda answer: [Turn("<image>\nDescribe!", answer), Turn("More?")])
    # "Describe." -> "Describe!" (one byte token each): kept up to the token before it, the image included
    assert encoded == [] and second.cached_tokens == first.prompt_tokens - len(". ASSISTANT:")
    assert second.token_ids == want.token_ids and second.prompt_tokens == want.prompt_tokens
