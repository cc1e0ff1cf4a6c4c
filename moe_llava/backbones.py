"""LLM backbones: transformers' own StableLm / Phi / Qwen2 causal LMs, FFNs swapped for MoE where the config says.

Each backbone family is described by a `Backbone` record: how to build the transformers config from the
released field names, which activation its FFN uses, and how a dense FFN's weights map onto the stacked
expert tensors (`fc1_weight` [F,H], `fc2_weight` [H,I], optional biases). That one mapping serves the
official checkpoint keys (`deepspeed_experts.{e}.<name>`) and stage III upcycling alike.

The StableLM/Phi checkpoint layout (`model.layers.{i}...`, transformers module names) is the canonical one;
a family with another layout (Qwen-1: `transformer.h.{i}.attn.c_attn`...) brings `to_canonical` /
`to_official` key translations, applied once when a checkpoint is read or written (moe_llava/checkpoint.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from runtime.errors import UserError

from . import qwen
from .config import MoELlavaConfig
from .moe import Activation, MoELayer

StateDict = dict[str, torch.Tensor]


def _same(state: StateDict) -> StateDict:
    return state


def _no_check(_fields: dict) -> None:
    return None


def _intermediate_size(fields: dict) -> int:
    return int(fields["intermediate_size"])


def _max_position_embeddings(fields: dict) -> int:
    return int(fields.get("max_position_embeddings", 2048))


@dataclass(frozen=True)
class Backbone:
    family: str
    hf_config: Callable[[dict], object]          # released backbone fields -> transformers config
    causal_lm: Callable[[object], nn.Module]      # transformers config -> *ForCausalLM
    activation: Activation
    # stacked name -> dense FFN parameter names, concatenated along dim 0 (gate before up)
    ffn_parts: dict[str, tuple[str, ...]]
    ffn_bias: bool
    ffn_size: Callable[[dict], int] = _intermediate_size            # released fields -> expert FFN width I
    context_length: Callable[[dict], int] = _max_position_embeddings  # positions the decoder may compute
    check: Callable[[dict], None] = _no_check                        # UserError for fields it cannot build
    to_canonical: Callable[[StateDict], StateDict] = _same           # official checkpoint keys -> canonical
    to_official: Callable[[StateDict], StateDict] = _same            # and back

    def build(self, config: MoELlavaConfig, attn_implementation: str = "sdpa") -> nn.Module:
        hf = self.hf_config(config.backbone)
        hf._attn_implementation = attn_implementation
        lm = self.causal_lm(hf)
        for idx in config.moe_layers:
            lm.model.layers[idx].mlp = self.moe_layer(config, idx)
        return lm

    def moe_layer(self, config: MoELlavaConfig, idx: int) -> MoELayer:
        moe = config.moe
        return MoELayer(config.hidden_size, self.ffn_size(config.backbone),
                        moe.experts_of(idx), moe.top_k, self.activation, self.ffn_bias,
                        moe.capacity_factor, moe.eval_capacity_factor, moe.min_capacity)

    def stack_ffn(self, tensors: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
        """Dense FFN parameters (named as in the backbone, under `prefix`) -> stacked-expert layout of one expert."""
        out = {}
        for stacked, parts in self.ffn_parts.items():
            names = [prefix + p for p in parts]
            if all(n in tensors for n in names):
                out[stacked] = torch.cat([tensors[n] for n in names], dim=0)
        return out

    def unstack_ffn(self, stacked: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
        """Inverse of `stack_ffn` for one expert."""
        out = {}
        for name, parts in self.ffn_parts.items():
            if name in stacked:
                for part, chunk in zip(parts, stacked[name].chunk(len(parts), dim=0)):
                    out[prefix + part] = chunk.contiguous()
        return out


def _stablelm_config(fields: dict):
    from transformers import StableLmConfig
    d = dict(fields)
    # The released checkpoints use the stablelm_epoch names; transformers uses the newer ones.
    d.setdefault("partial_rotary_factor", d.pop("rope_pct", 0.25))
    d.setdefault("layer_norm_eps", d.pop("norm_eps", 1e-5))
    d.setdefault("num_key_value_heads", d["num_attention_heads"])
    d.pop("model_type", None)
    return StableLmConfig(**d)


def _phi_config(fields: dict):
    from transformers import PhiConfig
    d = dict(fields)
    d.pop("model_type", None)
    return PhiConfig(**d)


def _stablelm_lm(hf_config):
    from transformers import StableLmForCausalLM
    return StableLmForCausalLM(hf_config)


def _phi_lm(hf_config):
    from transformers import PhiForCausalLM
    lm = PhiForCausalLM(hf_config)
    # MoE-LLaVA's Phi wrapper declares its own lm_head without bias.
    lm.lm_head = nn.Linear(hf_config.hidden_size, hf_config.vocab_size, bias=False)
    return lm


_SWIGLU_PARTS = {"fc1_weight": ("gate_proj.weight", "up_proj.weight"), "fc2_weight": ("down_proj.weight",)}

BACKBONES = {
    "stablelm": Backbone("stablelm", _stablelm_config, _stablelm_lm, Activation.SWIGLU, _SWIGLU_PARTS,
                         ffn_bias=False),
    "phi": Backbone("phi", _phi_config, _phi_lm, Activation.GELU_TANH,
                    {"fc1_weight": ("fc1.weight",), "fc1_bias": ("fc1.bias",),
                     "fc2_weight": ("fc2.weight",), "fc2_bias": ("fc2.bias",)}, ffn_bias=True),
    # Qwen-1 on Qwen2 modules (moe_llava/qwen.py): experts keep w1/w2/c_proj, canonically up/gate/down_proj
    "qwen": Backbone("qwen", qwen.hf_config, qwen.causal_lm, Activation.SWIGLU, _SWIGLU_PARTS, ffn_bias=False,
                     ffn_size=qwen.ffn_size, context_length=qwen.context_length, check=qwen.check_config,
                     to_canonical=qwen.to_canonical, to_official=qwen.to_official),
}


def backbone_for(config: MoELlavaConfig) -> Backbone:
    try:
        backbone = BACKBONES[config.family]
    except KeyError:
        raise UserError(f"unknown model_type {config.model_type!r}; expected one of "
                        f"{', '.join('moe_llava_' + f for f in BACKBONES)}") from None
    backbone.check(config.backbone)
    return backbone
