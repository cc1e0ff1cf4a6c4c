"""Image preprocessing of the PyTorch path: the reference's pad-to-square, then transformers' processor.

The runtime has its own numpy implementation (runtime/preprocess.py); tests hold the two together.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from runtime.preprocess import ImageSpec


def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Centre `image` on a square canvas of its longer side, filled with `fill` (reference `expand2square`)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


class HFImageProcessor:
    """PIL image -> pixel_values [3,S,S] float32, via transformers' (slow, PIL-based) processor."""

    def __init__(self, processor_config: dict, aspect_ratio: str = "pad"):
        from transformers import CLIPImageProcessorPil, SiglipImageProcessorPil
        config = {k: v for k, v in processor_config.items() if k not in ("image_processor_type", "processor_class")}
        is_siglip = "Siglip" in processor_config.get("image_processor_type", "")
        self.processor = (SiglipImageProcessorPil if is_siglip else CLIPImageProcessorPil)(**config)
        self.spec = ImageSpec.from_hf_processor_config(processor_config)
        self.aspect_ratio = aspect_ratio

    def __call__(self, image: Image.Image) -> np.ndarray:
        image = image.convert("RGB")
        if self.aspect_ratio == "pad":
            image = expand_to_square(image, self.spec.pad_color)
        return self.processor(images=image, return_tensors="np")["pixel_values"][0].astype(np.float32)
