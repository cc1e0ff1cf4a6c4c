"""Typed MoE-LLaVA config that reads and writes the official `config.json` as released.

The released config is one flat dict: backbone fields (StableLM / Phi-2 / Qwen names), the `mm_*` fields
and a `moe` dict. We keep the backbone fields verbatim (so a checkpoint round-trips byte-for-byte in its
keys) and type the multimodal and MoE parts.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path

from runtime.errors import UserError


class MoEMode(str, Enum):
    SPARSE = "sparse"            # every other layer from 0 (the released models)
    FIRST_HALF = "first_half"
    SECOND_HALF = "second_half"
    DENSE = "dense"


def moe_layer_indices(mode: MoEMode | str, num_layers: int) -> list[int]:
    mode = MoEMode(mode)
    if mode is MoEMode.SPARSE:
        return list(range(0, num_layers, 2))
    if mode is MoEMode.FIRST_HALF:
        return list(range(num_layers // 2))
    if mode is MoEMode.SECOND_HALF:
        return list(range(num_layers // 2, num_layers))
    return list(range(num_layers))


# official `moe` dict key -> our field name
_MOE_KEYS = {
    "moe_enable": "enable", "moe_mode": "mode", "moe_layers_idx": "layers_idx",
    "num_experts": "num_experts", "top_k_experts": "top_k", "capacity_factor": "capacity_factor",
    "eval_capacity_factor": "eval_capacity_factor", "min_capacity": "min_capacity",
    "ep_size": "ep_size", "use_residual": "use_residual",
    "router_aux_loss_coef": "router_aux_loss_coef", "train_modules": "train_modules",
}


@dataclass
class MoEConfig:
    enable: bool = False
    mode: str = MoEMode.SPARSE.value
    layers_idx: list[int] | None = None
    num_experts: list[int] = field(default_factory=lambda: [4])  # one entry per MoE layer
    top_k: int = 2
    capacity_factor: float = 1.5
    eval_capacity_factor: float = 2.0
    min_capacity: int = 0
    ep_size: int = 1
    use_residual: bool = False
    router_aux_loss_coef: float = 0.01
    train_modules: list[str] = field(default_factory=list)

    @classmethod
    def from_official(cls, d: dict | None) -> "MoEConfig":
        d = dict(d or {})
        kwargs = {ours: d.pop(theirs) for theirs, ours in _MOE_KEYS.items() if theirs in d}
        if isinstance(kwargs.get("num_experts"), int):
            kwargs["num_experts"] = [kwargs["num_experts"]]
        cfg = cls(**kwargs)
        cfg.extras = d  # unknown keys survive a round trip
        return cfg

    def to_official(self) -> dict:
        out = {theirs: getattr(self, ours) for theirs, ours in _MOE_KEYS.items()}
        out.update(getattr(self, "extras", {}))
        return out

    def resolve_layers(self, num_layers: int) -> list[int]:
        """MoE layer indices; num_experts broadcast to one entry per MoE layer."""
        if not self.enable:
            return []
        if self.use_residual:
            raise UserError("moe.use_residual=True (PR-MoE) is not supported; set it to false")
        if self.layers_idx is None:
            self.layers_idx = moe_layer_indices(self.mode, num_layers)
        bad = [i for i in self.layers_idx if not 0 <= i < num_layers]
        if bad:
            raise UserError(f"moe_layers_idx {bad} out of range for {num_layers} layers")
        if len(self.num_experts) == 1:
            self.num_experts = self.num_experts * len(self.layers_idx)
        if len(self.num_experts) != len(self.layers_idx):
            raise UserError(f"moe.num_experts has {len(self.num_experts)} entries for "
                            f"{len(self.layers_idx)} MoE layers")
        return list(self.layers_idx)

    def experts_of(self, layer: int) -> int:
        return self.num_experts[self.layers_idx.index(layer)]


@dataclass
class MoELlavaConfig:
    model_type: str                          # moe_llava_stablelm | moe_llava_phi | moe_llava_qwen
    backbone: dict                           # backbone fields exactly as released (rope_pct, norm_eps, ...)
    mm_image_tower: str                      # hub id or local path of the vision tower
    mm_hidden_size: int
    image_projector_type: str = "mlp2x_gelu"
    mm_vision_select_layer: int = -2
    mm_vision_select_feature: str = "patch"
    image_aspect_ratio: str = "pad"
    moe: MoEConfig = field(default_factory=MoEConfig)
    # Our extension: configs of a tower / processor that is not a known hub model, so that the
    # artefact carries everything needed to rebuild it (the demo model uses this).
    image_tower_config: dict | None = None
    image_processor_config: dict | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "MoELlavaConfig":
        d = dict(d)
        if "model_type" not in d:
            raise UserError("config.json has no model_type; expected moe_llava_stablelm/phi/qwen")
        typed = {f.name for f in fields(cls)} - {"backbone", "moe"}
        kwargs = {k: d.pop(k) for k in list(d) if k in typed}
        if "mm_image_tower" not in kwargs or "mm_hidden_size" not in kwargs:
            raise UserError("config.json lacks mm_image_tower / mm_hidden_size: not a MoE-LLaVA checkpoint")
        moe = MoEConfig.from_official(d.pop("moe", None))
        cfg = cls(backbone=d, moe=moe, **kwargs)
        cfg.moe.resolve_layers(cfg.num_layers)
        return cfg

    @classmethod
    def from_json(cls, path: str | Path) -> "MoELlavaConfig":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except FileNotFoundError:
            raise UserError(f"no config.json at {path}: pass a MoE-LLaVA checkpoint directory") from None
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON ({e})") from None

    def to_dict(self) -> dict:
        out = dict(self.backbone)
        for f in fields(self):
            if f.name not in ("backbone", "moe"):
                value = getattr(self, f.name)
                if value is not None or f.name not in ("image_tower_config", "image_processor_config"):
                    out[f.name] = value
        out["moe"] = self.moe.to_official()
        return out

    def save(self, directory: str | Path) -> None:
        Path(directory, "config.json").write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    # ---- derived fields, computed in one place -------------------------------------------------
    @property
    def family(self) -> str:
        """Backbone family: stablelm | phi | qwen (also for the dense -Stage2 types llava_stablelm, ...)."""
        return self.model_type.removeprefix("moe_").removeprefix("llava_")

    @property
    def num_layers(self) -> int:
        return int(self.backbone["num_hidden_layers"])

    @property
    def hidden_size(self) -> int:
        return int(self.backbone["hidden_size"])

    @property
    def vocab_size(self) -> int:
        return int(self.backbone["vocab_size"])

    @property
    def moe_layers(self) -> list[int]:
        return self.moe.resolve_layers(self.num_layers)

    def copy(self) -> "MoELlavaConfig":
        return MoELlavaConfig.from_dict(json.loads(json.dumps(self.to_dict())))

