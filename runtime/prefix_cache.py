"""Which conversation an engine's KV cache holds, so that a follow-up turn re-prefills only what changed.

A conversation is a list of keys, one per prompt id: the text token id, or for the image slot the image's
digest (the slot spans P visual positions in the cache). The reusable part of a new prompt is its longest
common key prefix with the cached one; the engine keeps those positions and prefills the rest, and encodes
the image only when its slot lies in the rest.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from runtime.errors import UserError
from runtime.prompt import IMAGE_TOKEN_INDEX

Key = int | str


def image_digest(image: Image.Image | str | Path | bytes) -> str:
    """A content hash of the image as given: its file or encoded bytes, or a PIL image's pixels."""
    h = hashlib.sha256()
    if isinstance(image, bytes):
        h.update(image)
    elif isinstance(image, (str, Path)):
        try:
            h.update(Path(image).read_bytes())
        except OSError as e:
            raise UserError(f"cannot read image {str(image)!r}: {e.strerror or e}") from None
    else:
        h.update(f"{image.mode}{image.size}".encode())
        h.update(image.tobytes())
    return h.hexdigest()


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
