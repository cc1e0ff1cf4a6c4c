"""Which conversation an engine's KV cache holds, so that a follow-up turn re-prefills only what changed.

A conversation is a list of keys, one per prompt id: the text token id, or for the image slot the image's
digest (the slot spans P visual positions in the cache). The reusable part of a new prompt is its longest
common key prefix with the cached one; the engine keeps those positions and prefills the rest, and encodes
the image only when its slot lies in the rest.

Also what a follow-up turn need not recompute to find that prefix: the digest of an image that has not changed
(ImageDigests) and the tokens of text that every request repeats (memoised_encoder). Both compare content in
full, so a change is never missed.
"""
from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from PIL import Image

from runtime.errors import UserError
from runtime.prompt import IMAGE_TOKEN_INDEX

Key = int | str


def image_content(image: Image.Image | str | Path | bytes) -> tuple[bytes, bytes]:
    """What identifies an image: (a PIL image's mode, size and palette, or b"" for bytes and files; its file or
    encoded bytes, or a PIL image's pixels)."""
    if isinstance(image, bytes):
        return b"", image
    if isinstance(image, (str, Path)):
        try:
            return b"", Path(image).read_bytes()
        except OSError as e:
            raise UserError(f"cannot read image {str(image)!r}: {e.strerror or e}") from None
    palette = image.getpalette() or []  # "P" images: the pixels are indices, the colours live here
    return f"{image.mode}{image.size}".encode() + bytes(palette), image.tobytes()


class ImageDigests:
    """image -> the sha256 of its image_content, remembering the last image: a follow-up turn resends the same
    image, and comparing its content with the remembered content (exact; memcmp, or nothing when it is the same
    bytes object) costs a fraction of hashing it again. A changed image, even by one byte, pixel or palette
    entry, is hashed anew. Holds one image's content between requests: its encoded bytes, or a PIL image's
    pixels."""

    def __init__(self):
        self._content: tuple[bytes, bytes] | None = None
        self._digest = ""

    def __call__(self, image: Image.Image | str | Path | bytes) -> str:
        content = image_content(image)
        if content != self._content:
            header, data = content
            h = hashlib.sha256(header)
            h.update(data)
            self._content, self._digest = content, h.hexdigest()
        return self._digest


def memoised_encoder(tokenizer, size: int = 8) -> Callable[[str], tuple[int, ...]]:
    """text -> tokenizer.encode(text).ids, remembered for the last `size` distinct texts (exact: keyed by the
    whole text, so a changed text is a new key). For text that recurs in every request, such as the system
    prompt before the image."""
    return functools.lru_cache(maxsize=size)(lambda text: tuple(tokenizer.encode(text).ids))


def conversation_keys(ids: list[int], digest: str | None) -> list[Key]:
    return [digest if i == IMAGE_TOKEN_INDEX else i for i in ids]


@dataclass
class PrefixCache:
    keys: list[Key]  # what the engine's cache holds, one key per prompt id or fed answer token
    visual_tokens: int = 0  # P of the cached image slot

    def positions(self, n_keys: int) -> int:
        """Cache positions that the first n_keys keys span."""
        has_image = any(isinstance(k, str) for k in self.keys[:n_keys])
        return n_keys + (self.visual_tokens - 1 if has_image else 0)

    def reusable(self, keys: list[Key]) -> int:
        """Keys of `keys` whose positions are already cached; at least one key is left to prefill (its logits
        start the answer)."""
        n = 0
        for cached, new in zip(self.keys, keys[:-1]):
            if cached != new:
                break
            n += 1
        return n
