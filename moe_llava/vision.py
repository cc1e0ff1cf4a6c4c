"""Vision towers (transformers' CLIP / SigLIP) with MoE-LLaVA's feature selection.

Features = hidden state of layer `mm_vision_select_layer` (-2); "patch" drops token 0. For CLIP that is
the CLS token; SigLIP has no CLS token, yet the reference drops index 0 all the same (729 -> 728 tokens):
we reproduce that quirk, because the released projectors were trained on exactly those 728 tokens.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from runtime.errors import UserError

from .tower_specs import CLIP_PROCESSOR, KNOWN_TOWERS, SIGLIP_PROCESSOR, TowerSpec  # noqa: F401 - re-exported
from .upcast import compute_dtype


def tower_kind(config: dict) -> str:
    model_type = config.get("model_type", "")
    return "siglip" if "siglip" in model_type else "clip"


class VisionTower(nn.Module):
    """pixel_values [N,3,S,S] -> selected features [N,P,Dv]."""

    def __init__(self, spec: TowerSpec, select_layer: int = -2, select_feature: str = "patch"):
        super().__init__()
        if select_feature not in ("patch", "cls_patch"):
            raise UserError(f"mm_vision_select_feature {select_feature!r} unsupported; use patch or cls_patch")
        self.spec, self.select_layer, self.select_feature = spec, select_layer, select_feature
        self.model = _build(spec)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(self.model)
        out = self.model(pixel_values.to(dtype), output_hidden_states=True)
        features = out.hidden_states[self.select_layer]               # [N,1+P or P,Dv]
        return features[:, 1:] if self.select_feature == "patch" else features

    @property
    def hidden_size(self) -> int:
        return int(self.spec.config["hidden_size"])


def _build(spec: TowerSpec) -> nn.Module:
    if spec.kind == "siglip":
        from transformers import SiglipVisionConfig, SiglipVisionModel
        return SiglipVisionModel(SiglipVisionConfig(**_fields(spec.config)))
    from transformers import CLIPVisionConfig, CLIPVisionModel
    return CLIPVisionModel(CLIPVisionConfig(**_fields(spec.config)))


def _fields(config: dict) -> dict:
    d = dict(config)
    if "vision_config" in d:  # a full CLIP/SigLIP (text+vision) config.json
        d = dict(d["vision_config"])
    d.pop("model_type", None)
    return d


def resolve_tower(name: str, checkpoint_dir: Path | None, embedded_config: dict | None,
                  embedded_processor: dict | None) -> tuple[TowerSpec, Path | None]:
    """Where the tower comes from: (spec, local directory with weights or None = use embedded weights).

    Order, as the reference resolves it first: a local directory named by `mm_image_tower` (absolute, or
    relative to the working or checkpoint directory); then a config embedded in our own artefacts; then
    a known hub id (built-in config, weights embedded in the checkpoint).
    """
    for candidate in _local_candidates(name, checkpoint_dir):
        if (candidate / "config.json").is_file():
            return _spec_from_dir(candidate), candidate
    if embedded_config is not None:
        return TowerSpec(tower_kind(embedded_config), embedded_config, embedded_processor or {}), None
    if name in KNOWN_TOWERS:
        return KNOWN_TOWERS[name], None
    raise UserError(f"vision tower {name!r} is neither a local directory nor a known tower "
                    f"({', '.join(KNOWN_TOWERS)}); pass --vision-tower DIR with its config.json and weights")


def _local_candidates(name: str, checkpoint_dir: Path | None) -> list[Path]:
    path = Path(name).expanduser()
    candidates = [path] if path.is_absolute() else [Path.cwd() / path]
    if checkpoint_dir is not None and not path.is_absolute():
        candidates.append(checkpoint_dir / path)
    return candidates


def _spec_from_dir(directory: Path) -> TowerSpec:
    import json
    config = json.loads((directory / "config.json").read_text())
    processor_file = directory / "preprocessor_config.json"
    kind = tower_kind(config)
    if processor_file.is_file():
        processor = json.loads(processor_file.read_text())
    else:
        processor = (SIGLIP_PROCESSOR if kind == "siglip" else CLIP_PROCESSOR)
    return TowerSpec(kind, _fields(config) | {"model_type": kind + "_vision_model"}, processor)


def load_tower_weights(tower: VisionTower, directory: Path) -> None:
    """Weights of a local CLIP/SigLIP directory (full model or vision-only), read as the reference does."""
    try:
        pretrained = type(tower.model).from_pretrained(str(directory), dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the vision tower in {directory}: {e}".splitlines()[0]) from None
    tower.model.load_state_dict(pretrained.state_dict())
