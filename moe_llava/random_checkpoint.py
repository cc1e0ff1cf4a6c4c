"""A random-weight checkpoint of a released shape, written tensor by tensor in fp16 (never an fp32 copy).

The model is built on the meta device only to learn the official names and shapes (checkpoint.ours_to_official);
each tensor's values are drawn in fp16 from a generator seeded by (seed, name) just before it is written, so
memory stays at one tensor and the result does not depend on shard size or write order. Init: weights
N(0, initializer_range) - which keeps router logits O(1), so top-2 routing spreads over the experts - norm
scales 1, biases 0. Sharded like the official uploads: model-0000i-of-0000n.safetensors + index.
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch
from tqdm import tqdm

from .checkpoint import ours_to_official
from .config import MoELlavaConfig
from .model import MoELlavaForCausalLM
from .safetensors_io import write_streamed
from .vision import resolve_tower
from .weight_files import SAFETENSORS_INDEX

SHARD_BYTES = 2 << 30


def official_shapes(config: MoELlavaConfig) -> dict[str, tuple[int, ...]]:
    """Official checkpoint name -> shape, for `config` with its built-in (or embedded-config) tower."""
    tower, _ = resolve_tower(config.mm_image_tower, None, config.image_tower_config, config.image_processor_config)
    with torch.device("meta"):
        model = MoELlavaForCausalLM(config, tower)
    return {k: tuple(v.shape) for k, v in ours_to_official(model.state_dict(), model.backbone).items()}


def random_tensor(name: str, shape: tuple[int, ...], seed: int, std: float) -> torch.Tensor:
    """fp16 values for `name`: norm scales 1, biases 0, everything else N(0, std)."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias":
        return torch.zeros(shape, dtype=torch.float16)
    if leaf == "weight" and len(shape) == 1:
        return torch.ones(shape, dtype=torch.float16)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.randn(shape, generator=generator, dtype=torch.float16).mul_(std)


def write_random_checkpoint(directory: str | Path, config: MoELlavaConfig, seed: int = 0,
                            shard_bytes: int = SHARD_BYTES) -> Path:
    """config.json + sharded fp16 safetensors + index into `directory` (no tokenizer)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shapes = official_shapes(config)
    shards = _split(shapes, shard_bytes)
    std = float(config.backbone.get("initializer_range", 0.02))
    weight_map = {}
    with tqdm(total=sum(_nbytes(s) for s in shapes.values()), desc="writing weights", unit="B",
              unit_scale=True) as bar:
        for i, names in enumerate(shards, start=1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"

            def make(name: str) -> torch.Tensor:
                bar.update(_nbytes(shapes[name]))
                return random_tensor(name, shapes[name], seed, std)
            write_streamed(directory / file, [(n, torch.float16, shapes[n]) for n in names], make)
            weight_map.update(dict.fromkeys(names, file))
    total = sum(_nbytes(s) for s in shapes.values())
    (directory / SAFETENSORS_INDEX).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.save(directory)
    return directory


def _nbytes(shape: tuple[int, ...]) -> int:
    n = 2  # fp16
    for d in shape:
        n *= d
    return n


def _split(shapes: dict[str, tuple[int, ...]], limit: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name in sorted(shapes):
        if shards[-1] and size + _nbytes(shapes[name]) > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += _nbytes(shapes[name])
    return shards
