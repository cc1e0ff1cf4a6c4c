"""Randomly initialised StableLM-shaped MoE-LLaVA checkpoints of a named size, for timing only.

Shapes: H hidden, I expert FFN width, L layers (MoE every other layer from 0, as released), E experts, K active,
V vocabulary. Every preset keeps H, I, L, V when E changes, so the ACTIVE size per token is the same for
every E and only the total size grows: that is what the scaling study needs.

  preset   H     I     L  heads  V      LM params at E=4   active per decode token
  tiny     64    128   2  4      512    0.22M              0.14M   (tests)
  mini     128   256   4  4      1024   1.5M               1.0M    (the embedded demo model's LM shape)
  small    512   1408  4  8      8192   34M                21M     (scaling study: 86M at E=16)
  300m     1024  2816  8  16     50304  310M               189M    (roofline check)
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from pathlib import Path


class Preset(str, Enum):
    TINY = "tiny"
    MINI = "mini"
    SMALL = "small"
    B300M = "300m"


@dataclass(frozen=True)
class Shape:
    hidden: int
    ffn: int
    layers: int
    heads: int
    vocab: int


SHAPES = {Preset.TINY: Shape(64, 128, 2, 4, 512), Preset.MINI: Shape(128, 256, 4, 4, 1024),
          Preset.SMALL: Shape(512, 1408, 4, 8, 8192),
          Preset.B300M: Shape(1024, 2816, 8, 16, 50304)}

# A small CLIP-shaped tower: 112 px / 14 px patches = 64 visual tokens, so prefill has some length.
TOWER = dict(model_type="clip_vision_model", hidden_size=128, intermediate_size=512, num_hidden_layers=2,
             num_attention_heads=4, image_size=112, patch_size=14, projection_dim=128, hidden_act="quick_gelu",
             layer_norm_eps=1e-5, num_channels=3)
PROCESSOR = dict(image_processor_type="CLIPImageProcessor", do_resize=True, size={"shortest_edge": 112}, resample=3,
                 do_center_crop=True, crop_size={"height": 112, "width": 112}, do_rescale=True,
                 rescale_factor=1 / 255, do_normalize=True, image_mean=[0.48145466, 0.4578275, 0.40821073],
                 image_std=[0.26862954, 0.26130258, 0.27577711], do_convert_rgb=True)
CORPUS = ["A chat between a curious user and an artificial intelligence assistant. USER: ASSISTANT:",
          "What is in the image? Describe the picture briefly. a red circle and a blue square on the left"]


def synthetic_config(preset: Preset | str, num_experts: int = 4, top_k: int = 2):
    """MoELlavaConfig of a StableLM-shaped model (SwiGLU experts, MoE on every other layer)."""
    from moe_llava.config import MoELlavaConfig
    s = SHAPES[Preset(preset)]
    return MoELlavaConfig.from_dict(dict(
        model_type="moe_llava_stablelm", vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.ffn,
        num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.heads, hidden_act="silu",
        rope_pct=0.25, rope_theta=10000, norm_eps=1e-5, use_qkv_bias=True, max_position_embeddings=1024,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=0,
        mm_image_tower="synthetic-clip", mm_hidden_size=TOWER["hidden_size"], image_projector_type="mlp2x_gelu",
        mm_vision_select_layer=-2, mm_vision_select_feature="patch", image_aspect_ratio="pad",
        image_tower_config=TOWER, image_processor_config=PROCESSOR,
        moe=dict(moe_enable=True, moe_mode="sparse", moe_layers_idx=None, num_experts=[num_experts],
                 top_k_experts=top_k, capacity_factor=1.5, eval_capacity_factor=2.0, min_capacity=0, ep_size=1,
                 use_residual=False, router_aux_loss_coef=0.01, train_modules=[])))


def write_synthetic_checkpoint(directory: str | Path, preset: Preset | str, num_experts: int = 4, top_k: int = 2,
                               seed: int = 0) -> Path:
    """An official-layout checkpoint dir (config.json, safetensors, tokenizer.json) with random weights."""
    import torch

    from moe_llava.loading import build_model, save_pretrained
    directory = Path(directory)
    torch.manual_seed(seed)
    model, _ = build_model(synthetic_config(preset, num_experts, top_k))
    tokenizer_dir = directory / "_tokenizer"
    write_tokenizer(tokenizer_dir, min(SHAPES[Preset(preset)].vocab, 512))
    save_pretrained(model.eval(), directory, tokenizer_dir)
    return directory


def write_tokenizer(directory: Path, vocab_size: int) -> None:
    """A small byte-level BPE (ids < vocab_size) trained on the prompt template: enough to tokenise prompts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 8, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
