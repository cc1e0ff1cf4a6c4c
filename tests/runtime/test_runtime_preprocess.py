"""runtime.preprocess against transformers' slow (PIL-backend) CLIP / SigLIP image processors.

Tolerance: both sides resize the same uint8 PIL image with Pillow's bicubic filter, crop at the same offsets,
rescale in float64 -> float32 and normalise elementwise in float32, so the outputs are expected to be
bit-identical (the test records that they are). The assertion allows 1e-6 - about one float32 ulp for
|values| of 2-4 - so that a numpy/transformers upgrade that reorders the float32 (x - mean) / std arithmetic
does not fail spuriously; any real discrepancy (one grey level = 1/255/std ~ 0.015) is 4 orders larger.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from runtime.errors import UserError
from runtime.preprocess import CLIP_336, SIGLIP_384, ImageSpec, load_image, preprocess


TOLERANCE = 1e-6

CLIP_336_CONFIG = {  # openai/clip-vit-large-patch14-336 preprocessor_config.json (old-style int sizes)
    "crop_size": 336, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 336,
}
SIGLIP_384_CONFIG = {  # google/siglip-so400m-patch14-384 preprocessor_config.json
    "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
    "image_processor_type": "SiglipImageProcessor", "image_std": [0.5, 0.5, 0.5],
    "processor_class": "SiglipProcessor",
    "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"height": 384, "width": 384},
}
CLIP_64_CONFIG = {  # a small CLIP variant, new-style dict sizes
    "image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 64},
    "crop_size": {"height": 64, "width": 64}, "do_center_crop": True, "resample": 3,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
}
CLIP_CROP_GT_RESIZE_CONFIG = {**CLIP_64_CONFIG, "size": {"shortest_edge": 57},  # crop > resize: zero-padded
                              "crop_size": {"height": 64, "width": 61}}
CONFIGS = {"clip336": CLIP_336_CONFIG, "siglip384": SIGLIP_384_CONFIG, "clip64": CLIP_64_CONFIG,
           "clip_crop_gt_resize": CLIP_CROP_GT_RESIZE_CONFIG}
SIZES = [(500, 300), (300, 500), (333, 217), (217, 333), (97, 41), (41, 97), (640, 479), (7, 1)]  # (w, h)


def hf_processor(config: dict):
    from transformers import CLIPImageProcessorPil, SiglipImageProcessorPil

    kind = config.get("image_processor_type") or config.get("feature_extractor_type")
    cls = SiglipImageProcessorPil if kind.startswith("Siglip") else CLIPImageProcessorPil
    keys = ("size", "crop_size", "do_center_crop", "do_normalize", "do_rescale", "do_resize", "image_mean",
            "image_std", "resample", "rescale_factor")
    return cls(**{k: config[k] for k in keys if k in config})


def noise_image(w: int, h: int, seed: int) -> Image.Image:
    """Random pixels: the hardest case for resampling parity (every filter tap matters)."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def reference_pad_to_square(image: Image.Image, mean) -> Image.Image:
    """Written independently of runtime.preprocess: numpy canvas of int(m*255), image at the centre."""
    color = [int(m * 255) for m in mean]
    w, h = image.size
    side = max(w, h)
    canvas = np.empty((side, side, 3), np.uint8)
    canvas[:] = color
    top, left = (side - h) // 2, (side - w) // 2
    canvas[top:top + h, left:left + w] = np.asarray(image)
    return Image.fromarray(canvas)


def hf_pixels(config: dict, image: Image.Image) -> np.ndarray:
    return hf_processor(config)(images=image, return_tensors="np")["pixel_values"][0]


@pytest.mark.parametrize("name", CONFIGS)
def test_pad_then_processor_parity(name):
    config = CONFIGS[name]
    spec = ImageSpec.from_hf_processor_config(config, aspect_ratio="pad")
    for i, (w, h) in enumerate(SIZES):
        image = noise_image(w, h, seed=i)
        expected = hf_pixels(config, reference_pad_to_square(image, config["image_mean"]))
        got = preprocess(image, spec)
        assert got.dtype == np.float32 and got.shape == expected.shape, (w, h, got.shape, expected.shape)
        assert got.shape[1:] == spec.output_size
        diff = float(np.abs(got - expected).max())
        assert diff <= TOLERANCE, f"{name} {w}x{h}: max abs diff {diff}"
        assert np.array_equal(got, expected), f"{name} {w}x{h}: not bit-identical (diff {diff})"


@pytest.mark.parametrize("name", CONFIGS)
def test_no_padding_matches_processor_on_non_square(name):
    """aspect_ratio="none" exercises the shortest-edge rule and crop offsets on non-square inputs."""
    config = CONFIGS[name]
    spec = ImageSpec.from_hf_processor_config(config, aspect_ratio="none")
    for i, (w, h) in enumerate(SIZES[:6]):
        image = noise_image(w, h, seed=100 + i)
        expected = hf_pixels(config, image)
        got = preprocess(image, spec)
        assert got.shape == expected.shape, (w, h)
        assert float(np.abs(got - expected).max()) <= TOLERANCE, (name, w, h)


def test_rgba_and_grayscale_inputs_are_converted_like_the_reference(tmp_path):
    rgba = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 50, 4), dtype=np.uint8), "RGBA")
    path = tmp_path / "a.png"
    rgba.save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (50, 30)
    assert np.array_equal(np.asarray(loaded), np.asarray(rgba.convert("RGB")))
    gray = Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 50), dtype=np.uint8), "L")
    assert np.array_equal(preprocess(gray, CLIP_336), preprocess(gray.convert("RGB"), CLIP_336))


def test_spec_from_hf_configs():
    clip = ImageSpec.from_hf_processor_config(CLIP_336_CONFIG)
    assert clip == CLIP_336
    assert clip.pad_color == (122, 116, 104)  # the reference's CLIP background
    siglip = ImageSpec.from_hf_processor_config(SIGLIP_384_CONFIG)
    assert siglip == SIGLIP_384
    assert siglip.pad_color == (127, 127, 127) and siglip.size == (384, 384) and siglip.crop_size is None
    with pytest.raises(UserError, match="unsupported image processor"):
        ImageSpec.from_hf_processor_config({"image_processor_type": "ViTImageProcessor"})


def test_spec_dict_round_trip_through_json():
    for spec in (CLIP_336, SIGLIP_384, ImageSpec.from_hf_processor_config(CLIP_CROP_GT_RESIZE_CONFIG, "none")):
        assert ImageSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(UserError, match="unknown keys"):
        ImageSpec.from_dict({**CLIP_336.to_dict(), "extra": 1})
    with pytest.raises(UserError, match="aspect_ratio"):
        ImageSpec(aspect_ratio="anyres")


def test_load_image_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope.jpg"
    with pytest.raises(UserError, match="nope.jpg"):
        load_image(missing)
    bogus = tmp_path / "bogus.png"
    bogus.write_text("not an image")
    with pytest.raises(UserError, match="bogus.png"):
        load_image(bogus)
    with pytest.raises(UserError, match=str(tmp_path.name)):
        load_image(tmp_path)  # a directory
