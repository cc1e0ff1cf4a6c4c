"""Stage I initialisation for real-scale training: a plain transformers LLM dir + a CLIP/SigLIP tower dir.

The result is a dense MoE-LLaVA model (moe_enable: false) with the LLM's and the tower's weights and a
freshly initialised projector - what the reference builds before stage I.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from runtime.errors import UserError

from ..checkpoint import read_state_dict
from ..config import MoELlavaConfig
from ..loading import build_model
from ..model import MoELlavaForCausalLM
from ..vision import load_tower_weights

FAMILIES = {"stablelm": "moe_llava_stablelm", "stablelm_epoch": "moe_llava_stablelm", "phi": "moe_llava_phi"}
DEFAULT_MOE = dict(moe_enable=False, moe_mode="sparse", moe_layers_idx=None, num_experts=[4], top_k_experts=2,
                   capacity_factor=1.5, eval_capacity_factor=2.0, min_capacity=0, ep_size=1, use_residual=False,
                   router_aux_loss_coef=0.01, train_modules=[])


def is_llava_dir(directory: Path) -> bool:
    """True for a MoE-LLaVA checkpoint dir, False for a plain LLM dir (judged by config.json)."""
    config = _read_config(directory)
    return "mm_image_tower" in config


def _read_config(directory: Path) -> dict:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise UserError(f"{directory} has no config.json; pass a MoE-LLaVA checkpoint or a transformers LLM dir")
    return json.loads(path.read_text())


def llava_config(llm_dir: Path, vision_tower: str, mm_hidden_size: int, model_max_length: int,
                 projector_type: str = "mlp2x_gelu") -> MoELlavaConfig:
    backbone = _read_config(llm_dir)
    family = backbone.pop("model_type", None)
    if family not in FAMILIES:
        raise UserError(f"{llm_dir}: LLM model_type {family!r} unsupported; expected one of {sorted(FAMILIES)}")
    for key in ("architectures", "auto_map", "transformers_version"):
        backbone.pop(key, None)
    return MoELlavaConfig.from_dict({
        **backbone, "model_type": FAMILIES[family], "mm_image_tower": str(vision_tower),
        "mm_hidden_size": mm_hidden_size, "image_projector_type": projector_type, "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad",
        "tokenizer_model_max_length": model_max_length, "moe": dict(DEFAULT_MOE)})


def from_parts(llm_dir: str | Path, vision_tower: str | Path, model_max_length: int = 2048,
               seed: int = 0) -> MoELlavaForCausalLM:
    """LLM weights from `llm_dir`, tower weights from the local dir `vision_tower`, a fresh projector."""
    llm_dir, tower_dir = Path(llm_dir), Path(vision_tower)
    if not (tower_dir / "config.json").is_file():
        raise UserError(f"--vision-tower {tower_dir} is not a local CLIP/SigLIP directory with config.json")
    tower_config = json.loads((tower_dir / "config.json").read_text())
    width = tower_config.get("vision_config", tower_config)["hidden_size"]
    torch.manual_seed(seed)
    model, resolved = build_model(llava_config(llm_dir, str(tower_dir.resolve()), width, model_max_length))
    load_tower_weights(model.vision_tower, resolved)
    load_llm_weights(model, llm_dir)
    return model


def load_llm_weights(model: MoELlavaForCausalLM, llm_dir: Path) -> None:
    state = read_state_dict(llm_dir)
    missing, unexpected = model.language_model.load_state_dict(state, strict=False)
    tied = model.language_model.config.tie_word_embeddings
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    unexpected = [k for k in unexpected if "rotary_emb" not in k]
    if missing or unexpected:
        raise UserError(f"{llm_dir}: LLM weights do not match its config (missing {missing[:4]}, "
                        f"unexpected {unexpected[:4]})")
    if tied:
        model.language_model.tie_weights()
