"""Optimisation-profile shape plans for the four TensorRT engines, from the export manifest alone.

Pure logic (no tensorrt, torch or onnx): the builder feeds these ranges to IOptimizationProfile.set_shape, the
trtexec command line prints them, the manifest records them, and the runtime's bindings must stay inside them.

Shapes: B batch (1..max_batch), S new positions, P past positions, M max_seq, N images, KVH kv heads, D head dim.
  vision     pixel_values [N,3,h,w]                    one profile  "images"    N 1..B
  projector  image_features [N,P_img,Dv]               one profile  "images"    N 1..B
  embed      input_ids [B,S]                           one profile  "tokens"    S 1..M (opt 1: decode runs it most)
  decoder    inputs_embeds [B,S,H], attention_mask [B,P+S], position_ids [B,S], past.{i}.{key,value} [B,KVH,P,D]
             profile 0 "prefill": S 1..M,  P 0          (the Engine protocol starts a new cache at prefill)
             profile 1 "decode":  S 1,     P 0..M-1     (so P+S <= M always)
             past is [B,P,KVH,D] when the engine is built from the KV-append graph (export/tensorrt_kv_append.py)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from runtime.errors import UserError
from runtime.manifest import DecoderSpec, Manifest, PartSpec, TensorSpec
from runtime.tensorrt.memory import KVMode

Dims = tuple[int, ...]
PREFILL, DECODE = "prefill", "decode"
TEXT_OPT = 64  # text tokens around the image in a typical prompt: the prefill profile's opt is image + this


@dataclass(frozen=True)
class ShapeRange:
    min: Dims
    opt: Dims
    max: Dims

    def __post_init__(self) -> None:
        if not len(self.min) == len(self.opt) == len(self.max):
            raise ValueError(f"min/opt/max ranks differ: {self.min} {self.opt} {self.max}")
        if not all(0 <= lo <= mid <= hi for lo, mid, hi in zip(self.min, self.opt, self.max)):
            raise ValueError(f"need 0 <= min <= opt <= max per axis: {self.min} {self.opt} {self.max}")

    def contains(self, shape: Dims) -> bool:
        return len(shape) == len(self.min) and all(lo <= d <= hi for lo, d, hi in zip(self.min, shape, self.max))

    def to_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShapeRange:
        return cls(tuple(d["min"]), tuple(d["opt"]), tuple(d["max"]))


@dataclass(frozen=True)
class Profile:
    name: str
    shapes: dict[str, ShapeRange]  # every input of the engine

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shapes": {k: r.to_dict() for k, r in self.shapes.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Profile:
        return cls(str(d["name"]), {k: ShapeRange.from_dict(r) for k, r in d["shapes"].items()})


@dataclass(frozen=True)
class BuildLimits:
    """What the engines accept: --max-batch images/sequences, --max-seq positions (prompt + answer)."""
    max_batch: int = 1
    max_seq: int = 2048

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise UserError(f"--max-batch must be at least 1, got {self.max_batch}")
        if self.max_seq < 2:
            raise UserError(f"--max-seq must be at least 2 (a prompt and one answer token), got {self.max_seq}")

    def fit(self, decoder: DecoderSpec) -> BuildLimits:
        """max_seq capped at the model's positions (max_position_embeddings)."""
        return BuildLimits(self.max_batch, min(self.max_seq, decoder.max_positions))


def _range(lo: Dims, opt: Dims, hi: Dims) -> ShapeRange:
    return ShapeRange(tuple(lo), tuple(opt), tuple(hi))


# ---- per part -----------------------------------------------------------------------------------
def vision_profiles(manifest: Manifest, limits: BuildLimits) -> tuple[Profile, ...]:
    channels, height, width = _static_tail(manifest.parts["vision"], "pixel_values", 3,
                                           fallback=_image_dims(manifest))
    one, top = (1, channels, height, width), (limits.max_batch, channels, height, width)
    return (Profile("images", {"pixel_values": _range(one, one, top)}),)


def projector_profiles(manifest: Manifest, limits: BuildLimits) -> tuple[Profile, ...]:
    tokens, dim = image_feature_dims(manifest)
    one, top = (1, tokens, dim), (limits.max_batch, tokens, dim)
    return (Profile("images", {"image_features": _range(one, one, top)}),)


def embed_profiles(manifest: Manifest, limits: BuildLimits) -> tuple[Profile, ...]:
    return (Profile("tokens", {"input_ids": _range((1, 1), (1, 1), (limits.max_batch, limits.max_seq))}),)


def decoder_profiles(decoder: DecoderSpec, limits: BuildLimits, image_tokens: int | None,
                     kv_mode: KVMode = KVMode.CONCAT) -> tuple[Profile, ...]:
    m = limits.max_seq
    opt_prompt = min(m, (image_tokens or 0) + TEXT_OPT)
    prefill = _decoder_ranges(decoder, limits, (1, opt_prompt, m), (0, 0, 0), kv_mode)
    decode = _decoder_ranges(decoder, limits, (1, 1, 1), (0, min(m - 1, opt_prompt + TEXT_OPT), m - 1), kv_mode)
    return Profile(PREFILL, prefill), Profile(DECODE, decode)


def _decoder_ranges(decoder: DecoderSpec, limits: BuildLimits, seq: Dims, past: Dims,
                    kv_mode: KVMode) -> dict[str, ShapeRange]:
    """min/opt/max of every decoder input; index 0/1/2 of seq, past and batch pick min/opt/max."""
    batch = (1, 1, limits.max_batch)
    h, kvh, d = decoder.hidden_size, decoder.num_kv_heads, decoder.head_dim

    def ranged(make) -> ShapeRange:
        return _range(*(make(i) for i in range(3)))
    shapes = {
        "inputs_embeds": ranged(lambda i: (batch[i], seq[i], h)),                  # [B,S,H]
        "attention_mask": ranged(lambda i: (batch[i], past[i] + seq[i])),          # [B,P+S]
        "position_ids": ranged(lambda i: (batch[i], seq[i])),                      # [B,S]
    }
    if kv_mode is KVMode.APPEND:
        cache = ranged(lambda i: (batch[i], past[i], kvh, d))                       # [B,P,KVH,D]
    else:
        cache = ranged(lambda i: (batch[i], kvh, past[i], d))                       # [B,KVH,P,D]
    past_names = decoder.io_names()[0][3:]
    return {**shapes, **{name: cache for name in past_names}}


# ---- the whole plan -----------------------------------------------------------------------------
def plan_profiles(manifest: Manifest, limits: BuildLimits,
                  kv_mode: KVMode = KVMode.CONCAT) -> dict[str, tuple[Profile, ...]]:
    """part -> its profiles (TensorRT profile index = position), checked against the manifest's I/O specs (the
    decoder's past position-major for the KV-append graph)."""
    limits = limits.fit(manifest.decoder)
    image_tokens = image_feature_dims(manifest)[0]
    plan = {
        "vision": vision_profiles(manifest, limits),
        "projector": projector_profiles(manifest, limits),
        "embed": embed_profiles(manifest, limits),
        "decoder": decoder_profiles(manifest.decoder, limits, image_tokens, kv_mode),
    }
    for part, profiles in plan.items():
        spec = manifest.parts[part]
        check_profiles(part, position_major(spec) if part == "decoder" and kv_mode is KVMode.APPEND else spec,
                       profiles)
    return plan


def position_major(spec: PartSpec) -> PartSpec:
    """The decoder's inputs as the KV-append graph declares them: past [B,KVH,P,D] -> [B,P,KVH,D]."""
    def swap(t: TensorSpec) -> TensorSpec:
        if not t.name.startswith("past_key_values."):
            return t
        b, kvh, p, d = t.shape
        return TensorSpec(t.name, (b, p, kvh, d), t.dtype)
    return PartSpec(spec.file, tuple(map(swap, spec.inputs)), spec.outputs)


def check_profiles(part: str, spec: PartSpec, profiles: tuple[Profile, ...]) -> None:
    """Every input has a range in every profile, of the declared rank, equal to the declared static dims."""
    declared = {t.name: t.shape for t in spec.inputs}
    for profile in profiles:
        if set(profile.shapes) != set(declared):
            raise UserError(f"{part}: profile {profile.name!r} covers {sorted(profile.shapes)} but the graph's "
                            f"inputs are {sorted(declared)}; re-run moe-export")
        for name, shape in declared.items():
            _check_range(part, profile.name, name, shape, profile.shapes[name])


def _check_range(part: str, profile: str, name: str, declared: tuple, r: ShapeRange) -> None:
    where = f"{part} input {name!r} (profile {profile!r})"
    if len(declared) != len(r.min):
        raise UserError(f"{where}: graph rank {len(declared)} but planned {list(r.max)}; re-run moe-export")
    for axis, dim in enumerate(declared):
        if isinstance(dim, int) and dim > 0 and not r.min[axis] == r.opt[axis] == r.max[axis] == dim:
            raise UserError(f"{where}: axis {axis} is {dim} in the graph but planned "
                            f"{r.min[axis]}..{r.max[axis]}; the manifest and the graph disagree")


def profiles_to_dict(plan: dict[str, tuple[Profile, ...]]) -> dict[str, list[dict[str, Any]]]:
    return {part: [p.to_dict() for p in profiles] for part, profiles in plan.items()}


# ---- static dimensions from the manifest --------------------------------------------------------
def image_feature_dims(manifest: Manifest) -> tuple[int, int]:
    """(P_img, Dv): visual tokens per image and vision width, from the vision output or projector input."""
    for part, name in (("vision", "image_features"), ("projector", "image_features")):
        spec = manifest.parts[part]
        tensor = next((t for t in spec.outputs + spec.inputs if t.name == name), None)
        if tensor is not None and _is_static(tensor.shape[1:]):
            return int(tensor.shape[1]), int(tensor.shape[2])
    raise UserError("image_features: the manifest gives no static [P_img, Dv] for the vision output or the "
                    "projector input; TensorRT profiles need them - re-run moe-export")


def _image_dims(manifest: Manifest) -> tuple[int, int, int] | None:
    crop = manifest.image.crop_size or manifest.image.size
    return (3, *crop) if crop else None


def _static_tail(spec: PartSpec, name: str, count: int, fallback: tuple[int, ...] | None) -> tuple[int, ...]:
    tail = spec.input(name).shape[-count:]
    if _is_static(tail):
        return tuple(int(d) for d in tail)
    if fallback is not None:
        return fallback
    raise UserError(f"{name}: dims {list(tail)} are not static in the manifest and the image spec gives no size")


def _is_static(dims) -> bool:
    return all(isinstance(d, int) and d > 0 for d in dims)
