"""What a follow-up turn no longer recomputes (runtime/prefix_cache.py): the image digest when the image is
unchanged, and the tokens of the text before the image. Each memo must give what recomputing gives, and notice
any change: a byte of the file, a pixel of the same PIL object, a character of the text."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from rt_helpers import EOS, TINY_SPEC, FakeEngine, byte_tokenizer
from runtime.generation import Pipeline
from runtime.prefix_cache import ImageDigests, memoised_encoder
from runtime.prompt import Turn, build_conversation, tokenize_with_image


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (5, 7, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def image_digest(image) -> str:
    """The reference: a digest computed with nothing remembered."""
    return ImageDigests()(image)


def test_image_digests_equal_a_fresh_digest_and_follow_every_change(tmp_path):
    digests = ImageDigests()
    data = _png(0)
    assert digests(data) == image_digest(data) == digests(bytes(bytearray(data)))  # an equal copy: same
    changed = data[:-1] + bytes([data[-1] ^ 1])
    assert digests(changed) == image_digest(changed) != image_digest(data)

    path = tmp_path / "image.png"
    path.write_bytes(data)
    assert digests(path) == image_digest(data)
    path.write_bytes(changed)  # the same path, new content
    assert digests(path) == image_digest(changed)

    image = Image.open(io.BytesIO(data)).convert("RGB")
    before = digests(image)
    assert before == image_digest(image.copy())
    image.putpixel((1, 1), tuple(255 - v for v in image.getpixel((1, 1))))  # the same object, one pixel
    assert digests(image) == image_digest(image) != before
    assert digests(image.convert("L")) == image_digest(image.convert("L")) != digests(image)  # mode counts

    indexed = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    before = digests(indexed)
    indexed.putpalette([255 - v for v in indexed.getpalette()])  # same indices, other colours
    assert digests(indexed) == image_digest(indexed) != before


def test_memoised_encoder_returns_the_tokenizer_ids_and_calls_it_once_per_text():
    tokenizer = byte_tokenizer()
    calls = []

    class Counting:
        def encode(self, text):
            calls.append(text)
            return tokenizer.encode(text)

    encode = memoised_encoder(Counting(), size=2)
    for text in ("ab", "ab", "abc", "ab"):
        assert list(encode(text)) == tokenizer.encode(text).ids
    assert calls == ["ab", "abc"]


def test_conversation_ids_equal_tokenising_the_whole_prompt_when_the_text_before_the_image_changes():
    pipe = Pipeline(FakeEngine([EOS]), byte_tokenizer(), "stablelm", TINY_SPEC, eos_token_id=EOS)
    for first in ("Look: <image>\nWhat is it?", "Look! <image>\nWhat is it?", "<image>\nWhat is it?"):
        turns = [Turn(first, "A star."), Turn("Which colour?")]
        want = tokenize_with_image(byte_tokenizer(), build_conversation("stablelm", turns, True))
        assert pipe.conversation_ids(turns, with_image=True) == want
