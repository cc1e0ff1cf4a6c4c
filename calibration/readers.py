"""Calibration tensors in the form each quantiser takes, for each exported part.

  ModelOpt quantize             one dict of arrays stacked along the batch axis (same length per input):
                                sequences are cut to the shortest, a prefix of a conversation being a
                                valid prefill of its own

Decoder feeds are a real prefill: inputs_embeds [1,S,H] with the visual tokens spliced in, attention_mask
[1,S] of ones, position_ids [1,S] = 0..S-1 and every past_key_values.* empty [1,KVH,0,D].
"""
from __future__ import annotations

import numpy as np

from export.compare import decoder_feed
from runtime.manifest import Manifest

from .calibset import EncodedSample

PARTS = ("vision", "projector", "embed", "decoder")


def part_feeds(manifest: Manifest, part: str, samples: list[EncodedSample]) -> list[dict[str, np.ndarray]]:
    """One feed per sample for `part` (vision/projector: images only, each image once)."""
    if part == "decoder":
        return [decoder_feed(manifest, s.inputs_embeds) for s in samples]
    if part == "embed":
        return [{"input_ids": s.text_ids[None]} for s in samples if len(s.text_ids)]
    images = _unique_images(samples)
    if part == "vision":
        return [{"pixel_values": s.pixel_values[None].astype(np.float32)} for s in images]
    if part == "projector":
        return [{"image_features": s.image_features[None].astype(np.float32)} for s in images]
    raise ValueError(f"unknown part {part!r}; expected one of {PARTS}")


def _unique_images(samples: list[EncodedSample]) -> list[EncodedSample]:
    seen, out = set(), []
    for s in samples:
        if s.pixel_values is not None:
            key = s.pixel_values.tobytes()
            if key not in seen:
                seen.add(key)
                out.append(s)
    return out


def stacked(feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Feeds -> one array per input, concatenated on axis 0; sequence axes cut to the shortest feed."""
    if not feeds:
        raise ValueError("no calibration feeds")
    length = min(_sequence_length(f) for f in feeds)
    return {name: np.concatenate([_cut(name, f[name], length) for f in feeds]) for name in feeds[0]}


def _sequence_length(feed: dict[str, np.ndarray]) -> int:
    for name in ("inputs_embeds", "input_ids"):
        if name in feed:
            return feed[name].shape[1]
    return 1 << 30  # images: nothing to cut


def _cut(name: str, array: np.ndarray, length: int) -> np.ndarray:
    if name in ("inputs_embeds", "input_ids", "attention_mask", "position_ids"):
        return array[:, :length]
    return array
