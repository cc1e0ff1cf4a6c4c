"""Official MoE-LLaVA checkpoint layout <-> our parameter names; sharded safetensors I/O.

Official (as released)                                               ours
model.image_tower.image_tower.vision_model.<rest>                    vision_tower.model.<rest>
model.mm_projector.image_spatial_proj.<i>.<w|b>                      projector.<i>.<w|b>
model.layers.<l>.mlp.deepspeed_moe.gate.wg.weight [E,H]              language_model.model.layers.<l>.mlp.router.weight
model.layers.<l>.mlp.deepspeed_moe.experts.deepspeed_experts.<e>.*   language_model.model.layers.<l>.mlp.fc{1,2}_{weight,bias}[e]
everything else <key>                                                language_model.<key>
Experts are stacked once here, at load time, and unstacked only when writing the official layout.
The table is the canonical (StableLM / Phi) layout. A family that names things otherwise (Qwen-1:
`transformer.h.<l>...`, `transformer.mm_projector...`) translates its keys into it first and back last,
with its Backbone record's `to_canonical` / `to_official` (moe_llava/qwen.py).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from runtime.errors import UserError

# transformers 4.x towers nested everything under `vision_model.`; 5.x modules are flat
TOWER, PROJECTOR = "model.image_tower.image_tower.vision_model.", "model.mm_projector.image_spatial_proj."
EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.(.+)$")
_ROUTER = re.compile(r"^model\.layers\.(\d+)\.mlp\.deepspeed_moe\.gate\.wg\.weight$")
_OURS_MOE = re.compile(r"^language_model\.model\.layers\.(\d+)\.mlp\.(router\.weight|fc[12]_(?:weight|bias))$")


def official_to_ours(state: dict[str, torch.Tensor], backbone) -> dict[str, torch.Tensor]:
    """Rename official keys and stack the per-expert FFNs into [E, ...] tensors."""
    ours: dict[str, torch.Tensor] = {}
    experts: dict[int, dict[int, dict[str, torch.Tensor]]] = {}
    for key, tensor in backbone.to_canonical(state).items():
        if m := EXPERT_KEY.match(key):
            experts.setdefault(int(m[1]), {}).setdefault(int(m[2]), {})[m[3]] = tensor
        elif m := _ROUTER.match(key):
            ours[f"language_model.model.layers.{m[1]}.mlp.router.weight"] = tensor
        elif key.startswith(TOWER):
            ours["vision_tower.model." + key[len(TOWER):]] = tensor
        elif key.startswith(PROJECTOR):
            ours["projector." + key[len(PROJECTOR):]] = tensor
        else:
            ours["language_model." + key] = tensor
    for layer, per_expert in experts.items():
        stacked = [backbone.stack_ffn(per_expert[e]) for e in sorted(per_expert)]
        if sorted(per_expert) != list(range(len(per_expert))):
            raise UserError(f"layer {layer}: expert indices {sorted(per_expert)} are not 0..E-1")
        for name in stacked[0]:
            ours[f"language_model.model.layers.{layer}.mlp.{name}"] = torch.stack([s[name] for s in stacked])
    return ours


def ours_to_official(state: dict[str, torch.Tensor], backbone) -> dict[str, torch.Tensor]:
    official: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if m := _OURS_MOE.match(key):
            layer, name = m[1], m[2]
            if name == "router.weight":
                official[f"model.layers.{layer}.mlp.deepspeed_moe.gate.wg.weight"] = tensor
                continue
            for e in range(tensor.shape[0]):
                prefix = f"model.layers.{layer}.mlp.deepspeed_moe.experts.deepspeed_experts.{e}."
                official.update(backbone.unstack_ffn({name: tensor[e]}, prefix))
        elif key.startswith("vision_tower.model."):
            official[TOWER + key[len("vision_tower.model."):]] = tensor
        elif key.startswith("projector."):
            official[PROJECTOR + key[len("projector."):]] = tensor
        else:
            official[key.removeprefix("language_model.")] = tensor
    return backbone.to_official(official)


def load_official_state(model, state: dict[str, torch.Tensor], tower_from_checkpoint: bool) -> None:
    """Load official-layout tensors into `model`, naming every missing, unexpected or misshapen key."""
    ours = official_to_ours(state, model.backbone)
    if not tower_from_checkpoint:  # the reference reloads the tower from mm_image_tower and ignores these
        ours = {k: v for k, v in ours.items() if not k.startswith("vision_tower.")}
    check_keys(model, ours, tower_from_checkpoint)
    model.load_state_dict(ours, strict=False)


def check_keys(model, ours: dict[str, torch.Tensor], tower_from_checkpoint: bool) -> None:
    """UserError naming every missing, unexpected or misshapen key of `ours` (tensors may be on meta)."""
    expected = model.state_dict()
    optional = {"language_model.lm_head.weight"} if model.language_model.config.tie_word_embeddings else set()
    missing = sorted(k for k in expected if k not in ours and k not in optional
                     and (tower_from_checkpoint or not k.startswith("vision_tower.")))
    unexpected = sorted(k for k in ours if k not in expected)
    misshapen = sorted(f"{k} {tuple(ours[k].shape)} != {tuple(v.shape)}"
                       for k, v in expected.items() if k in ours and ours[k].shape != v.shape)
    problems = [f"{label} ({len(keys)}): {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}"
                for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshapen))
                if keys]
    if problems:
        raise UserError("checkpoint does not match the config: " + "; ".join(problems))


# ---- files -------------------------------------------------------------------------------------
def read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory: (sharded) safetensors, else (sharded) pickled .bin."""
    from .weight_files import WeightFiles
    with WeightFiles(directory) as files:
        return {name: files.read(name) for name in files.names}


def write_state_dict(state: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int = 2 << 30) -> None:
    """Safetensors, sharded with a `model.safetensors.index.json` once over `max_shard_bytes`."""
    from safetensors.torch import save_file
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(state):
        tensor = state[key].detach().contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor.clone() if _shares_storage(tensor, shards) else tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], directory / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def _shares_storage(tensor: torch.Tensor, shards) -> bool:
    ptr = tensor.untyped_storage().data_ptr()
    return any(t.untyped_storage().data_ptr() == ptr for shard in shards for t in shard.values())
