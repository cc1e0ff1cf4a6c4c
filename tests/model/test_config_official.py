"""Released config.json files round-trip, and build models of the released sizes."""
import json

import pytest
import torch

from moe_llava.backbones import backbone_for
from moe_llava.config import MoELlavaConfig, moe_layer_indices
from moe_llava.model import MoELlavaForCausalLM
from moe_llava.vision import KNOWN_TOWERS
from runtime.errors import UserError

# The shape of MoE-LLaVA-StableLM-1.6B-4e's config.json (released field names: rope_pct, norm_eps, ...)
STABLELM_4E = {
    "architectures": ["MoELLaVAStablelmForCausalLM"], "bos_token_id": 100257, "eos_token_id": 100257,
    "hidden_act": "silu", "hidden_dropout": 0.0, "hidden_size": 2048, "image_aspect_ratio": "pad",
    "image_projector_type": "mlp2x_gelu", "initializer_range": 0.02, "intermediate_size": 5632,
    "max_position_embeddings": 4096, "mm_hidden_size": 1024, "mm_image_tower": "openai/clip-vit-large-patch14-336",
    "mm_projector_lr": None, "mm_use_im_patch_token": False, "mm_use_im_start_end": False,
    "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2, "model_type": "moe_llava_stablelm",
    "moe": {"capacity_factor": 1.5, "ep_size": 1, "eval_capacity_factor": 2.0, "min_capacity": 0,
            "moe_enable": True, "moe_layers_idx": list(range(0, 24, 2)), "moe_mode": "sparse",
            "num_experts": [4] * 12, "router_aux_loss_coef": 0.01, "top_k_experts": 2,
            "train_modules": ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "wg"], "use_residual": False},
    "norm_eps": 1e-05, "num_attention_heads": 32, "num_hidden_layers": 24, "num_key_value_heads": 32,
    "rope_pct": 0.25, "rope_theta": 10000, "tie_word_embeddings": False, "tokenizer_model_max_length": 2048,
    "tokenizer_padding_side": "right", "torch_dtype": "float16", "use_cache": False, "use_qkv_bias": True,
    "vocab_size": 100352, "X": ["Image"],
}
PHI2_4E = {
    "model_type": "moe_llava_phi", "hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "partial_rotary_factor": 0.4, "layer_norm_eps": 1e-5,
    "hidden_act": "gelu_new", "vocab_size": 51200, "rope_theta": 10000.0, "max_position_embeddings": 2048,
    "qk_layernorm": False, "tie_word_embeddings": False, "bos_token_id": 50256, "eos_token_id": 50256,
    "mm_hidden_size": 1024, "mm_image_tower": "openai/clip-vit-large-patch14-336",
    "image_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
    "image_aspect_ratio": "pad",
    "moe": {"moe_enable": True, "moe_mode": "sparse", "moe_layers_idx": None, "num_experts": [4],
            "top_k_experts": 2, "capacity_factor": 1.5, "eval_capacity_factor": 2.0, "min_capacity": 0,
            "ep_size": 1, "use_residual": False, "router_aux_loss_coef": 0.01, "train_modules": []},
}


def test_released_config_round_trips():
    cfg = MoELlavaConfig.from_dict(json.loads(json.dumps(STABLELM_4E)))
    assert cfg.to_dict() == STABLELM_4E
    assert cfg.moe_layers == list(range(0, 24, 2)) and cfg.moe.top_k == 2


def test_config_round_trips_through_save(tmp_path):
    cfg = MoELlavaConfig.from_dict(PHI2_4E)
    cfg.save(tmp_path)
    again = MoELlavaConfig.from_json(tmp_path / "config.json")
    assert again.to_dict() == cfg.to_dict()
    assert again.moe.num_experts == [4] * 16 and again.moe_layers == list(range(0, 32, 2))


def test_released_field_names_reach_transformers():
    hf = backbone_for(MoELlavaConfig.from_dict(STABLELM_4E)).hf_config(STABLELM_4E)
    assert hf.rope_parameters["partial_rotary_factor"] == 0.25
    assert hf.layer_norm_eps == 1e-5 and hf.use_qkv_bias is True and hf.num_key_value_heads == 32


@pytest.mark.parametrize("mode,want", [("sparse", [0, 2, 4]), ("first_half", [0, 1, 2]),
                                       ("second_half", [3, 4, 5]), ("dense", [0, 1, 2, 3, 4, 5])])
def test_moe_modes(mode, want):
    assert moe_layer_indices(mode, 6) == want


@pytest.mark.parametrize("config,total,active", [(STABLELM_4E, 2.9e9, 2.0e9), (PHI2_4E, 5.3e9, 3.6e9)])
def test_released_sizes(config, total, active):
    """Built on the meta device: parameter counts match the paper's (total, activated) figures.

    The paper counts the language model (with experts) only; the 0.3B CLIP tower is not in its figures.
    """
    cfg = MoELlavaConfig.from_dict(config)
    with torch.device("meta"):
        model = MoELlavaForCausalLM(cfg, KNOWN_TOWERS[cfg.mm_image_tower])
    n_total = sum(p.numel() for p in model.language_model.parameters())
    inactive = sum(m.fc1_weight.numel() + m.fc2_weight.numel() for m in model.moe_layers()) // 2  # 2 of 4 idle
    assert n_total == pytest.approx(total, rel=0.03)
    assert n_total - inactive == pytest.approx(active, rel=0.03)


def test_bad_configs_name_the_problem():
    with pytest.raises(UserError, match="model_type"):
        MoELlavaConfig.from_dict({"hidden_size": 8})
    bad = dict(STABLELM_4E, moe=dict(STABLELM_4E["moe"], num_experts=[4, 4]))
    with pytest.raises(UserError, match="num_experts"):
        MoELlavaConfig.from_dict(bad)
    with pytest.raises(UserError, match="model_type"):
        backbone_for(MoELlavaConfig.from_dict(dict(STABLELM_4E, model_type="moe_llava_mamba")))


def test_dense_stage2_model_types_are_understood():
    """-Stage2 checkpoints are dense LLaVA models with the reference's llava_* model types."""
    stage2 = dict(STABLELM_4E, model_type="llava_stablelm", moe={"moe_enable": False})
    cfg = MoELlavaConfig.from_dict(stage2)
    assert cfg.family == "stablelm" and cfg.moe_layers == []
    assert backbone_for(cfg).family == "stablelm"
