"""The released MoE-LLaVA configurations (config.json as published, LM + tower shapes), as named presets.

Used to write random-weight checkpoints of exactly the released shape (moe_llava/random_checkpoint.py), for
measuring load / export / run at the real size without a model hub. Field names are the released ones
(StableLM's rope_pct / norm_eps, Qwen-1's kv_channels / seq_length, ...).
"""
from __future__ import annotations

import json
from enum import Enum

from .config import MoELlavaConfig

CLIP_L_336, SIGLIP_384 = "openai/clip-vit-large-patch14-336", "google/siglip-so400m-patch14-384"


class ReleasedPreset(str, Enum):
    STABLELM_4E = "stablelm-1.6b-4e"
    STABLELM_4E_384 = "stablelm-1.6b-4e-384"
    PHI2_4E = "phi2-2.7b-4e"
    PHI2_4E_384 = "phi2-2.7b-4e-384"
    QWEN_4E = "qwen-1.8b-4e"


def _moe(layers: int, train_modules: list[str]) -> dict:
    return {"capacity_factor": 1.5, "ep_size": 1, "eval_capacity_factor": 2.0, "min_capacity": 0,
            "moe_enable": True, "moe_layers_idx": list(range(0, layers, 2)), "moe_mode": "sparse",
            "num_experts": [4] * (layers // 2), "router_aux_loss_coef": 0.01, "top_k_experts": 2,
            "train_modules": train_modules, "use_residual": False}


_MM = {"image_aspect_ratio": "pad", "image_projector_type": "mlp2x_gelu", "mm_hidden_size": 1024,
       "mm_image_tower": CLIP_L_336, "mm_projector_lr": None, "mm_use_im_patch_token": False,
       "mm_use_im_start_end": False, "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
       "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right", "torch_dtype": "float16",
       "use_cache": False, "X": ["Image"]}

STABLELM_4E = {
    **_MM, "architectures": ["MoELLaVAStablelmForCausalLM"], "model_type": "moe_llava_stablelm",
    "bos_token_id": 100257, "eos_token_id": 100257, "hidden_act": "silu", "hidden_dropout": 0.0,
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 5632, "max_position_embeddings": 4096,
    "moe": _moe(24, ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "wg"]),
    "norm_eps": 1e-05, "num_attention_heads": 32, "num_hidden_layers": 24, "num_key_value_heads": 32,
    "rope_pct": 0.25, "rope_theta": 10000, "tie_word_embeddings": False, "use_qkv_bias": True,
    "vocab_size": 100352,
}
PHI2_4E = {
    **_MM, "architectures": ["MoELLaVAPhiForCausalLM"], "model_type": "moe_llava_phi",
    "bos_token_id": 50256, "eos_token_id": 50256, "hidden_act": "gelu_new", "hidden_size": 2560,
    "initializer_range": 0.02, "intermediate_size": 10240, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 2048, "moe": _moe(32, ["fc1", "fc2", "wg"]), "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 32, "partial_rotary_factor": 0.4, "qk_layernorm": False,
    "rope_theta": 10000.0, "tie_word_embeddings": False, "vocab_size": 51200,
}
QWEN_4E = {
    **_MM, "architectures": ["MoELLaVAQWenForCausalLM"], "model_type": "moe_llava_qwen", "use_cache": True,
    "attn_dropout_prob": 0.0, "bf16": False, "emb_dropout_prob": 0.0, "fp16": True, "fp32": False,
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 11008, "kv_channels": 128,
    "layer_norm_epsilon": 1e-06, "max_position_embeddings": 8192,
    "moe": _moe(24, ["mlp.w1", "mlp.w2", "mlp.c_proj", "wg"]), "no_bias": True, "num_attention_heads": 16,
    "num_hidden_layers": 24, "onnx_safe": None, "rotary_emb_base": 10000, "rotary_pct": 1.0,
    "scale_attn_weights": True, "seq_length": 8192, "softmax_in_fp32": False, "tie_word_embeddings": False,
    "tokenizer_class": "QWenTokenizer", "use_cache_kernel": False, "use_cache_quantization": False,
    "use_dynamic_ntk": True, "use_flash_attn": "auto", "use_logn_attn": True, "vocab_size": 151936,
}
_SIGLIP = {"mm_image_tower": SIGLIP_384, "mm_hidden_size": 1152}

RELEASED = {ReleasedPreset.STABLELM_4E: STABLELM_4E, ReleasedPreset.STABLELM_4E_384: {**STABLELM_4E, **_SIGLIP},
            ReleasedPreset.PHI2_4E: PHI2_4E, ReleasedPreset.PHI2_4E_384: {**PHI2_4E, **_SIGLIP},
            ReleasedPreset.QWEN_4E: QWEN_4E}


def released_config(preset: ReleasedPreset | str) -> MoELlavaConfig:
    return MoELlavaConfig.from_dict(json.loads(json.dumps(RELEASED[ReleasedPreset(preset)])))
