"""The generation loop on a scripted fake Engine (see rt_helpers.FakeEngine)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from rt_helpers import EOS, PATCHES, TINY_SPEC, FakeEngine, byte_ids, byte_tokenizer
from runtime.engine import Engine
from runtime.errors import UserError
from runtime.generation import IncrementalDetokenizer, Pipeline
from runtime.preprocess import preprocess
from runtime.prompt import SYSTEM, Template

TIMING_KEYS = {"preprocess_ms", "vision_ms", "prefill_ms", "ttft_ms", "decode_ms", "decode_tokens_per_s",
               "total_ms", "prompt_tokens"}


def make_pipeline(script, template=Template.STABLELM, bos=None):
    return Pipeline(FakeEngine(script), byte_tokenizer(), template, TINY_SPEC, eos_token_id=EOS, bos_token_id=bos)


def image(seed=0, size=(13, 9)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_fake_engine_satisfies_the_protocol():
    assert isinstance(FakeEngine([EOS]), Engine)


def test_visual_tokens_are_spliced_exactly_at_the_image_slot():
    pipe = make_pipeline(byte_ids("ok") + [EOS])
    img = image()
    result = pipe.generate(img, "What is this?")
    # Independently: the template text around <image>, byte-tokenised.
    before = byte_ids(SYSTEM + " USER: ")
    after = byte_ids("\nWhat is this? ASSISTANT:")
    embeds = pipe.engine.prefill_inputs[0]
    assert embeds.shape == (len(before) + PATCHES + len(after), 4)
    assert result.prompt_tokens == embeds.shape[0] == result.timings["prompt_tokens"]
    np.testing.assert_array_equal(embeds[:len(before), 0], before)
    np.testing.assert_array_equal(embeds[:len(before), 3], 1)
    visual = embeds[len(before):len(before) + PATCHES]
    np.testing.assert_array_equal(visual[:, 0], -(np.arange(PATCHES) + 1))
    np.testing.assert_array_equal(visual[:, 3], 2)
    np.testing.assert_allclose(visual[:, 1], preprocess(img, TINY_SPEC).mean(), rtol=1e-5)
    np.testing.assert_array_equal(embeds[len(before) + PATCHES:, 0], after)
    assert pipe.engine.encoded[0].shape == (1, 3, 8, 8)


def test_image_first_in_plain_template():
    pipe = make_pipeline([EOS], template=Template.PLAIN)
    pipe.generate(image(), "a caption")
    embeds = pipe.engine.prefill_inputs[0]
    np.testing.assert_array_equal(embeds[:PATCHES, 0], -(np.arange(PATCHES) + 1))  # "<image>" is first
    np.testing.assert_array_equal(embeds[PATCHES:, 0], byte_ids("a caption"))


def test_bos_from_the_tokenizer_is_kept_once_before_the_image():
    from tokenizers.processors import TemplateProcessing

    tok = byte_tokenizer()  # a tokenizer that prepends BOS (= <|endoftext|> here) to every encode
    tok.post_processor = TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", EOS)])
    pipe = Pipeline(FakeEngine([EOS]), tok, Template.PLAIN, TINY_SPEC, eos_token_id=EOS, bos_token_id=EOS)
    pipe.generate(image(), "cap")
    np.testing.assert_array_equal(pipe.engine.prefill_inputs[0][:, 0],
                                  [EOS, *-(np.arange(PATCHES) + 1), *byte_ids("cap")])


def test_text_only_prompt_runs_no_vision():
    pipe = make_pipeline(byte_ids("hi") + [EOS])
    result = pipe.generate(None, "Hello")
    assert pipe.engine.encoded == []
    expected = byte_ids(SYSTEM + " USER: Hello ASSISTANT:")
    np.testing.assert_array_equal(pipe.engine.prefill_inputs[0][:, 0], expected)
    assert result.text == "hi"


def test_placeholder_count_must_match_the_image():
    with pytest.raises(UserError, match="placeholder"):
        make_pipeline([EOS]).generate(None, "<image>\nwhat?")
    with pytest.raises(UserError, match="placeholder"):
        make_pipeline([EOS]).generate(image(), "<image> and <image>")


def test_stops_at_eos_and_excludes_it():
    script = byte_ids("hi") + [EOS] + byte_ids("never")
    pipe = make_pipeline(script)
    result = pipe.generate(image(), "q", max_new_tokens=20)
    assert result.token_ids == byte_ids("hi")
    assert result.text == "hi"
    assert pipe.engine.decoded == byte_ids("hi")  # each sampled token is fed back; EOS never is


def test_max_new_tokens_bounds_the_output_and_decode_calls():
    pipe = make_pipeline(byte_ids("abcdefgh"))
    result = pipe.generate(None, "q", max_new_tokens=3)
    assert result.token_ids == byte_ids("abc") and result.text == "abc"
    assert pipe.engine.decoded == byte_ids("ab")  # the last token needs no decode step
    assert make_pipeline([EOS]).generate(None, "q", max_new_tokens=1).token_ids == []
    with pytest.raises(UserError):
        make_pipeline([EOS]).generate(None, "q", max_new_tokens=0)


def test_streamed_pieces_concatenate_to_the_text_without_broken_utf8():
    text = "héllo 世界 🙂!"
    pipe = make_pipeline(byte_ids(text) + [EOS])
    pieces = list(pipe.stream(image(), "q", max_new_tokens=64))
    assert "".join(pieces) == text == pipe.last_result.text
    assert all("\ufffd" not in p and p for p in pieces)
    assert "世" in pieces and "🙂" in pieces  # a multi-byte character arrives whole, as one piece
    assert pipe.last_result.token_ids == byte_ids(text)


def test_truncation_inside_a_character_still_flushes_consistently():
    pipe = make_pipeline(byte_ids("a世"))  # 1 + 3 bytes; stop after 3 -> an incomplete character
    pieces = list(pipe.stream(None, "q", max_new_tokens=3))
    assert pieces == ["a", "\ufffd"]
    assert "".join(pieces) == pipe.last_result.text


def test_detokenizer_text_equals_full_decode():
    tok = byte_tokenizer()
    detok = IncrementalDetokenizer(tok)
    ids = byte_ids("naïve – ok")
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == tok.decode(ids) == detok.text


def test_timings_and_last_result():
    pipe = make_pipeline(byte_ids("abc") + [EOS])
    stream = pipe.stream(image(), "q")
    assert pipe.last_result is None
    assert "".join(stream) == "abc"
    t = pipe.last_result.timings
    assert set(t) == TIMING_KEYS
    assert all(v >= 0 for v in t.values())
    assert t["ttft_ms"] <= t["total_ms"]
    assert t["decode_tokens_per_s"] > 0  # 3 decode steps (the third returns EOS)


def test_sampling_is_reproducible_by_seed():
    script = byte_ids("abcdefghij")

    def run(seed):
        pipe = Pipeline(FakeEngine(script, margin=1.0), byte_tokenizer(), Template.STABLELM, TINY_SPEC, EOS)
        return pipe.generate(None, "q", max_new_tokens=10, temperature=1.0, top_p=0.9, seed=seed).token_ids

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_image_path_is_loaded(tmp_path):
    path = tmp_path / "x.png"
    image().save(path)
    pipe = make_pipeline([EOS])
    pipe.generate(str(path), "q")
    np.testing.assert_array_equal(pipe.engine.encoded[0][0], preprocess(image(), TINY_SPEC))
    with pytest.raises(UserError, match="missing.png"):
        pipe.generate(str(tmp_path / "missing.png"), "q")


def test_pipeline_closes_its_engine():
    with make_pipeline([EOS]) as pipe:
        pass
    assert pipe.engine.closed
