"""Vision-to-language projector: `linear` or `mlp{N}x_gelu` (the released models use mlp2x_gelu)."""
from __future__ import annotations

import re

from torch import nn

from runtime.errors import UserError


def build_projector(projector_type: str, vision_size: int, hidden_size: int) -> nn.Module:
    """[N,P,Dv] -> [N,P,H]. Module indices match the official `image_spatial_proj.{0,2,...}` keys."""
    if projector_type == "linear":
        return nn.Linear(vision_size, hidden_size)
    match = re.fullmatch(r"mlp(\d+)x_gelu", projector_type)
    if not match:
        raise UserError(f"image_projector_type {projector_type!r} unsupported; use linear or mlp2x_gelu")
    layers: list[nn.Module] = [nn.Linear(vision_size, hidden_size)]
    for _ in range(int(match.group(1)) - 1):
        layers += [nn.GELU(), nn.Linear(hidden_size, hidden_size)]
    return nn.Sequential(*layers)
