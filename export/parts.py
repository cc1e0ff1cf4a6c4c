"""The four exported graphs as torch modules with the export contract's I/O (see runtime/manifest.py).

Shapes: N images, B batch, S new positions, P past positions, L layers, KVH kv heads, D head dim.
  vision     pixel_values [N,3,h,w]                                  -> image_features [N,P_img,Dv]
  projector  image_features [N,P_img,Dv]                             -> image_embeds [N,P_img,H]
  embed      input_ids [B,S] int64                                   -> inputs_embeds [B,S,H]
  decoder    inputs_embeds [B,S,H], attention_mask [B,P+S], position_ids [B,S],
             past_key_values.{i}.{key,value} [B,KVH,P,D]             -> logits [B,V] (last position, fp32),
                                                                        present.{i}.{key,value} [B,KVH,P+S,D]
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache

from moe_llava.model import MoELlavaForCausalLM


class VisionPart(nn.Module):
    def __init__(self, model: MoELlavaForCausalLM):
        super().__init__()
        self.tower = model.vision_tower

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.tower(pixel_values)


class ProjectorPart(nn.Module):
    def __init__(self, model: MoELlavaForCausalLM):
        super().__init__()
        self.projector = model.projector

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.projector(image_features)


class EmbedPart(nn.Module):
    def __init__(self, model: MoELlavaForCausalLM):
        super().__init__()
        self.embed = model.language_model.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)


class DecoderPart(nn.Module):
    """The LM with its KV cache as explicit tensors; logits only for the last position, in fp32.

    With fused attention (export/attention_lowering.py: `model.kv_slots` set) the layers read past and write
    present through the slots; otherwise transformers' DynamicCache concatenates them.
    """

    def __init__(self, model: MoELlavaForCausalLM):
        super().__init__()
        self.lm = model.language_model
        self.num_layers = model.config.num_layers
        self.slots = getattr(model, "kv_slots", None)

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        if self.slots is not None:
            return self._fused(inputs_embeds, attention_mask, position_ids, past)
        cache = DynamicCache(config=self.lm.config)
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.lm.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                            position_ids=position_ids, cache=cache, use_cache=True)
        logits = self.lm.lm_head(out.last_hidden_state[:, -1]).float()              # [B,V]
        present = [t for layer in cache.layers[: self.num_layers] for t in (layer.keys, layer.values)]
        return (logits, *present)

    def _fused(self, inputs_embeds, attention_mask, position_ids, past):
        self.slots.load(past, attention_mask, position_ids)
        out = self.lm.model(inputs_embeds=inputs_embeds, position_ids=position_ids, use_cache=False)
        logits = self.lm.lm_head(out.last_hidden_state[:, -1]).float()              # [B,V]
        return (logits, *self.slots.presents)


def kv_geometry(model: MoELlavaForCausalLM) -> tuple[int, int]:
    """(num_kv_heads, head_dim) of the decoder's attention."""
    hf = model.language_model.config
    heads = hf.num_attention_heads
    kv_heads = getattr(hf, "num_key_value_heads", None) or heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
    return kv_heads, head_dim


def decoder_io_names(num_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    return ["inputs_embeds", "attention_mask", "position_ids"] + past, ["logits"] + present


def decoder_sample(model: MoELlavaForCausalLM, dtype: torch.dtype, seq: int = 3, past: int = 2):
    """Example inputs for tracing (distinct sizes for each dynamic axis) and their dynamic shapes."""
    kv_heads, head_dim = kv_geometry(model)
    cache = [torch.randn(1, kv_heads, past, head_dim, dtype=dtype) for _ in range(2 * model.config.num_layers)]
    args = (torch.randn(1, seq, model.config.hidden_size, dtype=dtype),
            torch.ones(1, past + seq, dtype=torch.long), torch.arange(past, past + seq)[None], *cache)
    batch, s, p, total = (torch.export.Dim(n) for n in ("batch", "sequence", "past_sequence", "total_sequence"))
    shapes = ({0: batch, 1: s}, {0: batch, 1: total}, {0: batch, 1: s}, tuple([{0: batch, 2: p}] * len(cache)))
    return args, shapes
