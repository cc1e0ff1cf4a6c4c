"""Image preprocessing in numpy + Pillow, bit-identical to the reference's PyTorch-side pipeline.

Reference pipeline (image_aspect_ratio="pad"): Image.open(path).convert("RGB") -> pad to a square canvas
filled with int(m*255) of the processor mean, image centred -> transformers' slow CLIPImageProcessor /
SiglipImageProcessor: PIL resize, centre crop, x*(1/255) in float64 then float32, (x - mean) / std in float32.
Every step below reproduces the same arithmetic in the same dtype, so the output equals the processor's.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from runtime.errors import UserError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
ASPECT_RATIOS = ("pad", "none")
RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
_RESAMPLE_BY_PIL_ID = {int(v): k for k, v in RESAMPLE.items()}

# transformers' defaults per processor class, used for keys a preprocessor_config.json leaves out.
_HF_DEFAULTS = {
    "clip": {"size": {"shortest_edge": 224}, "do_center_crop": True, "crop_size": {"height": 224, "width": 224},
             "image_mean": OPENAI_CLIP_MEAN, "image_std": OPENAI_CLIP_STD},
    "siglip": {"size": {"height": 224, "width": 224}, "do_center_crop": False, "crop_size": None,
               "image_mean": SIGLIP_MEAN, "image_std": SIGLIP_STD},
}


def pad_color_for(mean: tuple[float, ...]) -> tuple[int, int, int]:
    """The reference's background colour: tuple(int(x*255) for x in image_mean), truncation included."""
    r, g, b = (int(m * 255) for m in mean)
    return (r, g, b)


@dataclass(frozen=True)
class ImageSpec:
    """Everything the runtime needs to turn an image into pixel_values; travels in the export manifest.

    Resize: `shortest_edge` (CLIP: short side -> N, long side int(N*long/short)) or `size` (SigLIP: exact
    (height, width)), or neither (no resize). `crop_size` (height, width) is an optional centre crop.
    """
    pad_color: tuple[int, int, int] = pad_color_for(OPENAI_CLIP_MEAN)
    aspect_ratio: str = "pad"  # "pad": expand to square with pad_color first; "none": feed as is
    shortest_edge: int | None = 336
    size: tuple[int, int] | None = None  # (height, width)
    crop_size: tuple[int, int] | None = (336, 336)  # (height, width)
    rescale_factor: float = 1 / 255
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    resample: str = "bicubic"

    def __post_init__(self) -> None:
        if self.aspect_ratio not in ASPECT_RATIOS:
            raise UserError(f"image aspect_ratio {self.aspect_ratio!r}: expected one of {ASPECT_RATIOS}")
        if self.resample not in RESAMPLE:
            raise UserError(f"image resample {self.resample!r}: expected one of {sorted(RESAMPLE)}")
        if self.shortest_edge is not None and self.size is not None:
            raise UserError("image spec: give either shortest_edge or size (height, width), not both")
        if len(self.pad_color) != 3 or len(self.mean) != 3 or len(self.std) != 3:
            raise UserError("image spec: pad_color, mean and std need 3 channels each")

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of pixel_values for a square input (always the case with "pad"); None if unknown."""
        if self.crop_size is not None:
            return self.crop_size
        if self.size is not None:
            return self.size
        if self.shortest_edge is not None and self.aspect_ratio == "pad":
            return (self.shortest_edge, self.shortest_edge)
        return None

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageSpec:
        unknown, missing = set(d) - set(cls.__dataclass_fields__), set(cls.__dataclass_fields__) - set(d)
        if unknown or missing:
            raise UserError(f"image spec: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}")
        tuples = {k: tuple(v) for k, v in d.items() if isinstance(v, list)}
        return cls(**{**d, **tuples})

    @classmethod
    def from_hf_processor_config(cls, d: dict[str, Any], aspect_ratio: str = "pad") -> ImageSpec:
        """From a transformers preprocessor_config.json (CLIPImageProcessor or SiglipImageProcessor keys)."""
        kind = _processor_kind(d)
        cfg = {**_HF_DEFAULTS[kind], **d}
        shortest_edge, size = _hf_resize(cfg) if cfg.get("do_resize", True) else (None, None)
        crop = _hw(cfg.get("crop_size"), "crop_size") if cfg.get("do_center_crop") else None
        mean = tuple(float(m) for m in cfg["image_mean"])
        std = tuple(float(s) for s in cfg["image_std"])
        return cls(
            pad_color=pad_color_for(mean),  # the reference pads with the processor mean even if not normalising
            aspect_ratio=aspect_ratio,
            shortest_edge=shortest_edge,
            size=size,
            crop_size=crop,
            rescale_factor=float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else 1.0,
            mean=mean if cfg.get("do_normalize", True) else (0.0, 0.0, 0.0),
            std=std if cfg.get("do_normalize", True) else (1.0, 1.0, 1.0),
            resample=_resample_name(cfg.get("resample", int(Image.Resampling.BICUBIC))),
        )


CLIP_336 = ImageSpec()
SIGLIP_384 = ImageSpec(pad_color=pad_color_for(SIGLIP_MEAN), shortest_edge=None, size=(384, 384), crop_size=None,
                       mean=SIGLIP_MEAN, std=SIGLIP_STD)


def _processor_kind(d: dict[str, Any]) -> str:
    name = str(d.get("image_processor_type") or d.get("feature_extractor_type") or "CLIPImageProcessor")
    for kind in _HF_DEFAULTS:
        if name.lower().startswith(kind):
            return kind
    raise UserError(f"preprocessor_config.json: unsupported image processor {name!r} "
                    "(expected CLIPImageProcessor or SiglipImageProcessor)")


def _hf_resize(cfg: dict[str, Any]) -> tuple[int | None, tuple[int, int] | None]:
    """transformers' size rule: an int or {"shortest_edge"} resizes the short side; {"height","width"} is exact."""
    size = cfg["size"]
    if isinstance(size, int):
        return size, None
    if isinstance(size, dict) and set(size) == {"shortest_edge"}:
        return int(size["shortest_edge"]), None
    return None, _hw(size, "size")


def _hw(value: Any, key: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, dict) and set(value) == {"height", "width"}:
        return (int(value["height"]), int(value["width"]))
    raise UserError(f"preprocessor_config.json: unsupported {key} {value!r}")


def _resample_name(value: Any) -> str:
    if isinstance(value, str) and value in RESAMPLE:
        return value
    try:
        return _RESAMPLE_BY_PIL_ID[int(value)]
    except (KeyError, TypeError, ValueError):
        raise UserError(f"preprocessor_config.json: unsupported resample {value!r} "
                        f"(supported: {_RESAMPLE_BY_PIL_ID})") from None


def load_image(source: str | Path | bytes) -> Image.Image:
    """Open an image file (a path, or its bytes) as RGB (alpha dropped, as the reference's .convert("RGB") does).

    Pillow's decompression-bomb warning (more than Image.MAX_IMAGE_PIXELS pixels) is an error here: a server
    must not decode a small file into gigabytes.
    """
    name = "the image data" if isinstance(source, bytes) else f"image {str(source)!r}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
                return image.convert("RGB")
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read {name}: {e}") from None
    except (OSError, UnidentifiedImageError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise UserError(f"cannot read {name}: {reason}") from None


def expand_to_square(image: Image.Image, color: tuple[int, int, int]) -> Image.Image:
    """Centre the image on a (max side)^2 canvas of `color`; offsets round down, as the reference's."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), color)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def resize_output_size(height: int, width: int, spec: ImageSpec) -> tuple[int, int]:
    """transformers' get_resize_output_image_size(default_to_square=False) for shortest_edge, else spec.size."""
    if spec.size is not None:
        return spec.size
    if spec.shortest_edge is None:
        return (height, width)
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = spec.shortest_edge, int(spec.shortest_edge * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def center_crop(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """[C,h,w] -> [C,height,width]; top/left = (orig - crop) // 2, zero padding (centred, ceil) if too small."""
    _, h, w = x.shape
    if h < height or w < width:
        ph, pw = max(height - h, 0), max(width - w, 0)
        top_pad, left_pad = -(-ph // 2), -(-pw // 2)
        x = np.pad(x, ((0, 0), (top_pad, ph - top_pad), (left_pad, pw - left_pad)))
        h, w = x.shape[1:]
    top, left = (h - height) // 2, (w - width) // 2
    return x[:, top:top + height, left:left + width]


def preprocess(image: Image.Image, spec: ImageSpec) -> np.ndarray:
    """PIL image -> pixel_values [3,h,w] float32."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    if spec.aspect_ratio == "pad":
        image = expand_to_square(image, spec.pad_color)
    height, width = resize_output_size(image.height, image.width, spec)
    if spec.shortest_edge is not None or spec.size is not None:  # PIL returns a copy when the size is unchanged
        image = image.resize((width, height), resample=RESAMPLE[spec.resample])
    x = np.asarray(image).transpose(2, 0, 1)  # [H,W,3] -> [3,H,W] uint8
    if spec.crop_size is not None:
        x = center_crop(x, *spec.crop_size)
    x = (x.astype(np.float64) * spec.rescale_factor).astype(np.float32)
    mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(spec.std, dtype=np.float32)[:, None, None]
    return np.ascontiguousarray((x - mean) / std, dtype=np.float32)
