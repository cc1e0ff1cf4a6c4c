"""MoE-LLaVA in PyTorch: vision tower -> projector -> visual tokens spliced at <image> -> MoE decoder LLM.

Shapes: B batch, S sequence, N images, P visual tokens per image, Dv vision width, H hidden, V vocab.
Parameter names: `vision_tower.model.*` (transformers CLIP/SigLIP), `projector.*`, `language_model.*`
(transformers StableLm/Phi causal LM, MoE layers at `language_model.model.layers.{i}.mlp`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from runtime.prompt import IGNORE_INDEX, IMAGE_TOKEN_INDEX

from .backbones import Backbone, backbone_for
from .config import MoELlavaConfig
from .moe import MoELayer
from .projector import build_projector
from .vision import TowerSpec, VisionTower


@dataclass
class MoELlavaOutput:
    logits: torch.Tensor | None           # [B,S,V]; None when asked for the loss only
    loss: torch.Tensor | None = None      # LM loss + coef * sum of aux losses
    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None  # sum over MoE layers, before the coefficient
    past_key_values: object | None = None
    lm_tokens: torch.Tensor | None = None  # supervised positions behind lm_loss (a mean over them)


class MoELlavaForCausalLM(nn.Module):
    def __init__(self, config: MoELlavaConfig, tower: TowerSpec, attn_implementation: str = "sdpa"):
        super().__init__()
        self.config = config
        self.backbone: Backbone = backbone_for(config)
        self.vision_tower = VisionTower(tower, config.mm_vision_select_layer, config.mm_vision_select_feature)
        self.projector = build_projector(config.image_projector_type, config.mm_hidden_size, config.hidden_size)
        self.language_model = self.backbone.build(config, attn_implementation)
        self.model_max_length = int(config.backbone.get("tokenizer_model_max_length") or 2048)

    # ---- pieces ------------------------------------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        return self.language_model.model.layers

    def moe_layers(self) -> list[MoELayer]:
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, MoELayer)]

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.get_input_embeddings()(input_ids)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N,3,S,S] -> visual tokens [N,P,H]."""
        return self.projector(self.vision_tower(pixel_values))

    def decode_embeds(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      past_key_values=None, use_cache: bool = False, last_only: bool = False):
        """The decoder on embeddings: -> (logits [B,S,V], or [B,1,V] for the last position only, cache)."""
        out = self.language_model.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                        cache=past_key_values, use_cache=use_cache)
        hidden = out.last_hidden_state[:, -1:] if last_only else out.last_hidden_state
        return self.language_model.lm_head(hidden), out.cache

    # ---- multimodal splice -------------------------------------------------------------------
    def splice(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None,
               attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None):
        """Replace each IMAGE_TOKEN_INDEX by the next image's P tokens, sample by sample; right-pad.

        Returns (inputs_embeds [B,S',H], attention_mask [B,S'], labels [B,S'] or None). Padding in the
        input (attention_mask == 0) is removed first; sequences are cut to `model_max_length`.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        embeds, targets, next_image = [], [], 0
        for b in range(input_ids.shape[0]):
            keep = attention_mask[b].bool()
            ids = input_ids[b][keep]
            lab = labels[b][keep] if labels is not None else torch.full_like(ids, IGNORE_INDEX)
            slots = (ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()
            pieces, piece_labels, start = [], [], 0
            for slot in slots + [len(ids)]:
                pieces.append(self.embed_tokens(ids[start:slot]))
                piece_labels.append(lab[start:slot])
                if slot < len(ids):
                    if image_embeds is None or next_image >= image_embeds.shape[0]:
                        raise ValueError("more <image> placeholders than images")
                    pieces.append(image_embeds[next_image].to(pieces[-1].dtype))
                    piece_labels.append(lab.new_full((image_embeds.shape[1],), IGNORE_INDEX))
                    next_image += 1
                start = slot + 1
            embeds.append(torch.cat(pieces)[: self.model_max_length])
            targets.append(torch.cat(piece_labels)[: self.model_max_length])
        return _right_pad(embeds, targets, labels is not None)

    # ---- training / scoring forward ----------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                return_logits: bool = True, **_ignored) -> MoELlavaOutput:
        """With labels and return_logits=False (training), the LM head runs on the supervised positions only:
        the same loss, without the [B,S,V] logits of image, question and padding positions (~90 % of a
        demo batch)."""
        image_embeds = self.encode_images(pixel_values) if pixel_values is not None else None
        inputs_embeds, mask, labels = self.splice(input_ids, image_embeds, attention_mask, labels)
        if labels is not None and not return_logits:
            out = self.language_model.model(inputs_embeds=inputs_embeds, attention_mask=mask, use_cache=False)
            targets = labels[:, 1:]
            supervised = targets != IGNORE_INDEX                                           # [B,S-1]
            hidden = out.last_hidden_state[:, :-1][supervised]                             # [T,H]
            return self._with_loss(None, self.language_model.lm_head(hidden), targets[supervised])
        logits, _ = self.decode_embeds(inputs_embeds, mask)
        if labels is None:
            return MoELlavaOutput(logits=logits, aux_loss=self._aux_loss())
        return self._with_loss(logits, logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())

    def _with_loss(self, logits: torch.Tensor | None, scores: torch.Tensor, targets: torch.Tensor) -> MoELlavaOutput:
        """scores [T,V] predict targets [T] (IGNORE_INDEX = not supervised): mean LM loss + aux loss."""
        aux = self._aux_loss()
        lm_loss = F.cross_entropy(scores.float(), targets, ignore_index=IGNORE_INDEX)
        loss = lm_loss if aux is None else lm_loss + self.config.moe.router_aux_loss_coef * aux
        return MoELlavaOutput(logits=logits, loss=loss, lm_loss=lm_loss, aux_loss=aux,
                              lm_tokens=(targets != IGNORE_INDEX).sum())

    def _aux_loss(self) -> torch.Tensor | None:
        losses = [m.aux_loss for m in self.moe_layers() if self.training and m.aux_loss is not None]
        return torch.stack(losses).sum() if losses else None

    def to_dtype(self, dtype: torch.dtype) -> "MoELlavaForCausalLM":
        """Cast for inference, keeping the routers in fp32."""
        self.to(dtype)
        for moe in self.moe_layers():
            moe.router.float()
        return self


def _right_pad(embeds: list[torch.Tensor], targets: list[torch.Tensor], with_labels: bool):
    length = max(e.shape[0] for e in embeds)
    batch = len(embeds)
    hidden = embeds[0].shape[-1]
    out = embeds[0].new_zeros(batch, length, hidden)
    mask = torch.zeros(batch, length, dtype=torch.long, device=out.device)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long, device=out.device)
    for b, (e, t) in enumerate(zip(embeds, targets)):
        out[b, : e.shape[0]] = e
        mask[b, : e.shape[0]] = 1
        labels[b, : t.shape[0]] = t
    return out, mask, (labels if with_labels else None)
