"""Demo only: supervised pre-training of the from-scratch vision tower ("stage 0").

A real MoE-LLaVA starts from a pretrained CLIP whose patch features already say what is where; offline
there is no such tower, and a frozen random tower would leave stages I-III nothing to read. Standing in
for CLIP's pretraining, this stage teaches the tower, on the TRAINING scenes only, to describe each
object through the tokens the projector will see (layer -2, CLS dropped):
  - per patch: which shape class and which colour covers it (linear probe, cross-entropy);
  - per object: its shape and colour from the coverage-weighted mean of its patches' features;
  - per patch, again: which shape classes the whole image contains (multi-label). This puts a global
    summary into every token, as CLIP's late-layer patch tokens carry global semantics; it is what lets
    a small LLM learn object existence (POPE) within the demo's budget.
The probes are thrown away; stages I-III then keep the tower frozen, as they do for real checkpoints.

Shapes: N images, P patches (g x g grid), O objects per scene (<= MAX_OBJECTS), Dv tower width.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data import COLORS, SHAPES, Scene
from ..vision import VisionTower

SHAPE_CLASSES = ("none",) + SHAPES     # patch label 0 = background
COLOR_CLASSES = ("none",) + tuple(COLORS)
MAX_OBJECTS = 4
MIN_COVER = 0.25                       # a patch belongs to an object covering at least this much of it


def coverage(scene: Scene, image_size: int, patch_size: int) -> np.ndarray:
    """[O,P] fraction of each patch covered by each object's bounding box, in the tower's input frame
    (pad to a centred square, resize to image_size)."""
    side = max(scene.width, scene.height)
    scale = image_size / side
    offset = np.array([(side - scene.width) // 2, (side - scene.height) // 2])
    edges = np.arange(image_size // patch_size + 1) * patch_size
    out = []
    for obj in scene.objects:
        lo = (np.array(obj.center) - obj.size / 2 + offset) * scale                # [2] x, y
        hi = (np.array(obj.center) + obj.size / 2 + offset) * scale
        overlap = [np.clip(np.minimum(hi[a], edges[1:]) - np.maximum(lo[a], edges[:-1]), 0, None) / patch_size
                   for a in (0, 1)]                                                  # [g] each
        out.append(np.outer(overlap[1], overlap[0]).reshape(-1))                    # rows = y
    return np.stack(out)


def probe_targets(scene: Scene, image_size: int, patch_size: int) -> dict[str, np.ndarray]:
    cover = coverage(scene, image_size, patch_size)                                 # [O,P]
    owner = cover.argmax(0)
    covered = cover.max(0) >= MIN_COVER
    shapes = np.array([SHAPE_CLASSES.index(o.shape) for o in scene.objects])
    colors = np.array([COLOR_CLASSES.index(o.color) for o in scene.objects])
    weights = np.zeros((MAX_OBJECTS, cover.shape[1]), np.float32)
    weights[: len(cover)] = cover / cover.sum(1, keepdims=True)
    pad = [-100] * (MAX_OBJECTS - len(shapes))  # ignored by cross-entropy
    present = np.zeros(len(SHAPES), np.float32)
    present[shapes - 1] = 1
    return {"patch_shapes": np.where(covered, shapes[owner], 0), "patch_colors": np.where(covered, colors[owner], 0),
            "object_weights": weights, "object_shapes": np.array(list(shapes - 1) + pad),
            "object_colors": np.array(list(colors - 1) + pad), "present": present}


class TowerProbe(nn.Module):
    """The tower + linear probes; forward returns {"loss"} for the HF Trainer."""

    def __init__(self, tower: VisionTower):
        super().__init__()
        self.tower = tower
        width = tower.hidden_size
        self.patch_probe = nn.Linear(width, len(SHAPE_CLASSES) + len(COLOR_CLASSES))
        self.object_probe = nn.Linear(width, len(SHAPES) + len(COLORS))
        self.presence_probe = nn.Linear(width, len(SHAPES))

    def object_logits(self, features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        pooled = torch.einsum("nop,npd->nod", weights, features)                     # [N,O,Dv]
        return self.object_probe(pooled)                                             # [N,O,8+7]

    def forward(self, pixel_values, patch_shapes, patch_colors, object_weights, object_shapes, object_colors,
                present, **_):
        features = self.tower(pixel_values)                                          # [N,P,Dv]
        patch = self.patch_probe(features)                                           # [N,P,9+8]
        obj = self.object_logits(features, object_weights)                           # [N,O,8+7]
        presence = self.presence_probe(features)                                     # [N,P,8]
        s = len(SHAPE_CLASSES)
        loss = (F.cross_entropy(patch[..., :s].flatten(0, 1), patch_shapes.flatten())
                + F.cross_entropy(patch[..., s:].flatten(0, 1), patch_colors.flatten())
                + F.cross_entropy(obj[..., :s - 1].flatten(0, 1), object_shapes.flatten())
                + F.cross_entropy(obj[..., s - 1:].flatten(0, 1), object_colors.flatten())
                + F.binary_cross_entropy_with_logits(presence, present[:, None].expand_as(presence)))
        return {"loss": loss}

    @torch.no_grad()
    def accuracy(self, data: dict[str, torch.Tensor], batch: int = 256) -> dict[str, float]:
        """Object-level shape / colour accuracy, and presence accuracy from single patch tokens."""
        hits, total, presence, patches = np.zeros(2), 0, 0.0, 0
        for i in range(0, len(data["pixel_values"]), batch):
            part = {k: v[i:i + batch] for k, v in data.items()}
            features = self.tower(part["pixel_values"])
            obj = self.object_logits(features, part["object_weights"])
            valid = part["object_shapes"] >= 0
            s = len(SHAPES)
            hits += [(obj[..., :s].argmax(-1) == part["object_shapes"])[valid].sum().item(),
                     (obj[..., s:].argmax(-1) == part["object_colors"])[valid].sum().item()]
            total += valid.sum().item()
            guess = self.presence_probe(features) > 0                                # [N,P,8]
            presence += (guess == part["present"][:, None].bool()).float().mean(-1).sum().item()
            patches += guess.shape[0] * guess.shape[1]
        return {"object_shape_acc": hits[0] / max(total, 1), "object_color_acc": hits[1] / max(total, 1),
                "presence_acc": presence / max(patches, 1)}


class ProbeDataset(torch.utils.data.Dataset):
    """Preprocessed images + probe targets, all in memory (a few thousand 96 px images)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors["pixel_values"])

    def __getitem__(self, i: int) -> dict:
        return {k: v[i] for k, v in self.tensors.items()}
