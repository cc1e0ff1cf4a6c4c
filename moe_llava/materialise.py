"""Fill a model built without weights from its checkpoint files, one tensor (or one layer's experts) at a time.

Why: `build -> load_state_dict` holds the random init, the whole file contents and the result at once (3.7x
the checkpoint at the released size). Here parameters start on the meta device (buffers such as rotary
frequencies are real), each official tensor is read, renamed / stacked by checkpoint.official_to_ours, cast
to the compute dtype and put in place, and the file copy is dropped before the next one: peak memory is the
weights in the compute dtype plus the largest single tensor as stored (heap.py returns the freed read buffers'
memory as it goes). Experts are copied straight into
their preallocated [E, ...] stack (no per-expert concatenation, no stacked file-dtype copy).
"""
from __future__ import annotations

import contextlib
import re

import torch
from torch import nn
from tqdm import tqdm

from runtime.errors import UserError

from .checkpoint import EXPERT_KEY, check_keys, official_to_ours
from .heap import PeriodicRelease, release_freed_memory
from .weight_files import WeightFiles

# one MoE layer's per-expert tensors are stacked together, so they are read together (Qwen-1: transformer.h.)
_EXPERT_LAYER = re.compile(r"\.(?:layers|h)\.(\d+)\.mlp\.deepspeed_moe\.experts\.")
FP32_KEYS = re.compile(r"\.mlp\.router\.weight$")  # routers stay in fp32 (MoELlavaForCausalLM.to_dtype)


@contextlib.contextmanager
def parameters_on_meta():
    """Modules built inside get meta parameters (no memory, no init cost) but real buffers."""
    from accelerate import init_empty_weights
    with init_empty_weights(include_buffers=False):
        yield


def load_units(names: list[str]) -> list[list[str]]:
    """Official names grouped into what must be read together: one MoE layer's experts, else one tensor."""
    experts: dict[str, list[str]] = {}
    units = []
    for name in names:
        if m := _EXPERT_LAYER.search(name):
            experts.setdefault(m[1], []).append(name)
        else:
            units.append([name])
    return units + list(experts.values())


def materialise(model: nn.Module, files: WeightFiles, dtype: torch.dtype, tower_from_checkpoint: bool) -> None:
    """Put every checkpoint tensor into `model` (built under `parameters_on_meta`) in `dtype`."""
    skip = () if tower_from_checkpoint else ("vision_tower.",)
    ours_meta = official_to_ours({n: files.meta(n) for n in files.names}, model.backbone)
    check_keys(model, {k: v for k, v in ours_meta.items() if not k.startswith(skip or "\0")},
               tower_from_checkpoint)
    units = load_units(files.names)
    total = sum(files.nbytes(n) for n in files.names)
    release = PeriodicRelease()
    with tqdm(total=total, desc="loading weights", unit="B", unit_scale=True, leave=False) as bar:
        for unit in units:
            if len(unit) > 1 or _EXPERT_LAYER.search(unit[0]):
                _load_experts(model, files, unit, dtype, ours_meta)
            else:
                for key, tensor in official_to_ours({unit[0]: files.read(unit[0])}, model.backbone).items():
                    if not (skip and key.startswith(skip)):
                        _assign(model, key, tensor, torch.float32 if FP32_KEYS.search(key) else dtype)
            loaded = sum(files.nbytes(n) for n in unit)
            bar.update(loaded)
            release.add(loaded)
    release_freed_memory()
    _tie_or_fail(model)


def _load_experts(model: nn.Module, files: WeightFiles, unit: list[str], dtype: torch.dtype,
                  ours_meta: dict[str, torch.Tensor]) -> None:
    """One MoE layer's per-expert tensors copied into their [E, ...] stacks (shapes checked by check_keys)."""
    stacks: dict[str, torch.Tensor] = {}
    for canonical, official in _canonical_names(model.backbone, files, unit).items():
        m = EXPERT_KEY.match(canonical)                                   # layer, expert, dense name
        stacked, index = _stack_slot(model.backbone, m[3])
        key = f"language_model.model.layers.{m[1]}.mlp.{stacked}"
        if key not in stacks:
            stacks[key] = torch.empty(ours_meta[key].shape, dtype=dtype)  # [E, parts*rows, ...]
        tensor = files.read(official)
        rows = tensor.shape[0]
        stacks[key][int(m[2]), index * rows:(index + 1) * rows].copy_(tensor)
    for key, stack in stacks.items():
        _assign(model, key, stack, dtype)


def _canonical_names(backbone, files: WeightFiles, names: list[str]) -> dict[str, str]:
    """canonical key -> official key (expert keys are renamed, never split, by every family)."""
    stand_ins = {n: files.meta(n) for n in names}
    official_of = {id(t): n for n, t in stand_ins.items()}
    return {k: official_of[id(t)] for k, t in backbone.to_canonical(stand_ins).items()}


def _stack_slot(backbone, dense_name: str) -> tuple[str, int]:
    """(stacked parameter, position among its concatenated parts) of one dense FFN parameter."""
    for stacked, parts in backbone.ffn_parts.items():
        if dense_name in parts:
            return stacked, parts.index(dense_name)
    raise UserError(f"expert parameter {dense_name!r} has no place in the stacked layout")


def _assign(model: nn.Module, key: str, tensor: torch.Tensor, dtype: torch.dtype) -> None:
    module_name, _, leaf = key.rpartition(".")
    module = model.get_submodule(module_name)
    if tensor.is_floating_point() and tensor.dtype != dtype:
        tensor = tensor.to(dtype)
    elif not tensor.is_contiguous() or tensor.untyped_storage().nbytes() != tensor.nbytes:
        tensor = tensor.clone()  # a chunk of a fused file tensor: own its memory, drop the rest
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(tensor)
    else:
        module._buffers[leaf] = tensor


def _tie_or_fail(model: nn.Module) -> None:
    lm = model.language_model
    if lm.config.tie_word_embeddings and lm.lm_head.weight.is_meta:
        lm.lm_head.weight = lm.get_input_embeddings().weight
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise UserError(f"checkpoint leaves {len(left)} parameters unset: {', '.join(left[:6])}")
