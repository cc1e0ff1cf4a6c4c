"""Configs of the vision towers the released checkpoints name (no torch: the memory plan reads them too).

Built in so that a checkpoint, which embeds the tower weights, loads offline without the hub.
"""
from __future__ import annotations

from dataclasses import dataclass

CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
                   layer_norm_eps=1e-5, num_channels=3)
CLIP_PROCESSOR = dict(image_processor_type="CLIPImageProcessor", do_resize=True, size={"shortest_edge": 336},
                       resample=3, do_center_crop=True, crop_size={"height": 336, "width": 336},
                       do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                       image_mean=[0.48145466, 0.4578275, 0.40821073],
                       image_std=[0.26862954, 0.26130258, 0.27577711], do_convert_rgb=True)
SIGLIP_384 = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                   image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                   num_channels=3)
SIGLIP_PROCESSOR = dict(image_processor_type="SiglipImageProcessor", do_resize=True,
                         size={"height": 384, "width": 384}, resample=3, do_rescale=True,
                         rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5, 0.5, 0.5],
                         image_std=[0.5, 0.5, 0.5])


@dataclass(frozen=True)
class TowerSpec:
    kind: str                # "clip" | "siglip"
    config: dict             # transformers vision config fields
    processor: dict          # preprocessor_config.json fields


KNOWN_TOWERS = {
    "openai/clip-vit-large-patch14-336": TowerSpec("clip", CLIP_L_336, CLIP_PROCESSOR),
    "google/siglip-so400m-patch14-384": TowerSpec("siglip", SIGLIP_384, SIGLIP_PROCESSOR),
}
