"""Qwen-1 config fields, the official key layout and released sizes."""
import json

import pytest
import torch

from moe_llava.backbones import backbone_for
from moe_llava.checkpoint import read_state_dict
from moe_llava.config import MoELlavaConfig
from moe_llava.loading import load_pretrained
from moe_llava.model import MoELlavaForCausalLM
from moe_llava.qwen import to_canonical, to_official
from moe_llava.vision import KNOWN_TOWERS
from runtime.errors import UserError
from tiny import tiny_config, tiny_model, write_tiny_checkpoint

# The shape of MoE-LLaVA-Qwen-1.8B-4e's config.json: Qwen-1.8B's fields (Qwen-1 names) + MoE-LLaVA's.
QWEN_4E = {
    "architectures": ["MoELLaVAQWenForCausalLM"], "attn_dropout_prob": 0.0, "bf16": False, "emb_dropout_prob": 0.0,
    "fp16": True, "fp32": False, "hidden_size": 2048, "image_aspect_ratio": "pad", "image_projector_type": "mlp2x_gelu",
    "initializer_range": 0.02, "intermediate_size": 11008, "kv_channels": 128, "layer_norm_epsilon": 1e-06,
    "max_position_embeddings": 8192, "mm_hidden_size": 1024, "mm_image_tower": "openai/clip-vit-large-patch14-336",
    "mm_use_im_patch_token": False, "mm_use_im_start_end": False, "mm_vision_select_feature": "patch",
    "mm_vision_select_layer": -2, "model_type": "moe_llava_qwen",
    "moe": {"capacity_factor": 1.5, "ep_size": 1, "eval_capacity_factor": 2.0, "min_capacity": 0,
            "moe_enable": True, "moe_layers_idx": list(range(0, 24, 2)), "moe_mode": "sparse",
            "num_experts": [4] * 12, "router_aux_loss_coef": 0.01, "top_k_experts": 2,
            "train_modules": ["mlp.w1", "mlp.w2", "mlp.c_proj", "wg"], "use_residual": False},
    "no_bias": True, "num_attention_heads": 16, "num_hidden_layers": 24, "onnx_safe": None, "rotary_emb_base": 10000,
    "rotary_pct": 1.0, "scale_attn_weights": True, "seq_length": 8192, "softmax_in_fp32": False,
    "tie_word_embeddings": False, "tokenizer_class": "QWenTokenizer", "tokenizer_model_max_length": 2048,
    "torch_dtype": "float16", "use_cache": True, "use_cache_kernel": False, "use_cache_quantization": False,
    "use_dynamic_ntk": True, "use_flash_attn": "auto", "use_logn_attn": True, "vocab_size": 151936,
}


def test_released_config_round_trips_and_maps_to_qwen2():
    cfg = MoELlavaConfig.from_dict(json.loads(json.dumps(QWEN_4E)))
    assert cfg.to_dict() == QWEN_4E and cfg.family == "qwen"
    backbone = backbone_for(cfg)
    hf = backbone.hf_config(cfg.backbone)
    assert type(hf).__name__ == "Qwen2Config"
    assert hf.intermediate_size == 5504 and backbone.ffn_size(cfg.backbone) == 5504  # 11008 counts w1 + w2
    assert hf.num_attention_heads == hf.num_key_value_heads == 16 and hf.hidden_size // 16 == 128
    assert hf.rms_norm_eps == 1e-6 and hf.rope_parameters["rope_theta"] == 10000.0
    assert hf.tie_word_embeddings is False and hf.use_sliding_window is False
    assert backbone.context_length(cfg.backbone) == hf.max_position_embeddings == 8192


def test_released_sizes():
    """Built on the meta device: 2.2B activated parameters (the paper's figure, language model only)."""
    cfg = MoELlavaConfig.from_dict(QWEN_4E)
    with torch.device("meta"):
        model = MoELlavaForCausalLM(cfg, KNOWN_TOWERS[cfg.mm_image_tower])
    n_total = sum(p.numel() for p in model.language_model.parameters())
    inactive = sum(m.fc1_weight.numel() + m.fc2_weight.numel() for m in model.moe_layers()) // 2  # 2 of 4 idle
    assert n_total - inactive == pytest.approx(2.2e9, rel=0.03)                  # 2.243B
    # 1.837B dense Qwen-1.8B + 12 MoE layers x (3 more experts x 33.8M + an 8K router)
    assert n_total == 1_836_828_672 + 12 * (3 * 3 * 2048 * 5504 + 4 * 2048) == 3_054_323_712


def test_context_length_is_seq_length_when_long_context_tricks_are_on():
    backbone = backbone_for(tiny_config("qwen"))
    fields = dict(tiny_config("qwen").backbone, seq_length=128, max_position_embeddings=1024)
    assert backbone.context_length(fields) == 128
    plain = dict(fields, use_dynamic_ntk=False, use_logn_attn=False)  # nothing switches at seq_length
    assert backbone.context_length(plain) == 1024


@pytest.mark.parametrize("change,message", [
    ({"kv_channels": 8}, "kv_channels"), ({"rotary_pct": 0.5}, "rotary_pct"), ({"no_bias": False}, "no_bias"),
    ({"intermediate_size": 191}, "even"), ({"seq_length": None}, "seq_length")])
def test_unsupported_qwen_fields_are_named(change, message):
    fields = {k: v for k, v in dict(tiny_config("qwen").to_dict(), **change).items() if v is not None}
    with pytest.raises(UserError, match=message):
        backbone_for(MoELlavaConfig.from_dict(fields))


def test_official_layout_is_qwen1s(tmp_path):
    """Every key written is one Qwen-1 / MoE-LLaVA-Qwen names (listed here from the published facts)."""
    write_tiny_checkpoint(tmp_path, "qwen")
    keys = set(read_state_dict(tmp_path))
    want = {"transformer.wte.weight", "transformer.ln_f.weight", "lm_head.weight"}
    for i in range(4):
        h = f"transformer.h.{i}."
        want |= {h + n for n in ("ln_1.weight", "ln_2.weight", "attn.c_attn.weight", "attn.c_attn.bias",
                                 "attn.c_proj.weight")}
        if i % 2:  # sparse: MoE in layers 0 and 2
            want |= {f"{h}mlp.{n}.weight" for n in ("w1", "w2", "c_proj")}
        else:
            want.add(h + "mlp.deepspeed_moe.gate.wg.weight")
            want |= {f"{h}mlp.deepspeed_moe.experts.deepspeed_experts.{e}.{n}.weight"
                     for e in range(4) for n in ("w1", "w2", "c_proj")}
    want |= {f"transformer.mm_projector.image_spatial_proj.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    tower = {k for k in keys if k.startswith("transformer.image_tower.image_tower.vision_model.")}
    assert tower and keys - tower == want
    state = read_state_dict(tmp_path)
    assert state["transformer.h.0.attn.c_attn.weight"].shape == (3 * 64, 64)
    assert state["transformer.h.1.mlp.w1.weight"].shape == (96, 64)          # intermediate_size // 2
    round_trip = to_official(to_canonical(state))
    assert round_trip.keys() == state.keys() and all(torch.equal(round_trip[k], state[k]) for k in state)


def test_experts_are_the_official_w1_w2_c_proj(tmp_path):
    """Stacked fc1 = [gate; up] = [w2; w1] (w2 is the gated branch), fc2 = c_proj."""
    model = write_tiny_checkpoint(tmp_path, "qwen")
    state = read_state_dict(tmp_path)
    moe = model.layers[2].mlp
    e = "transformer.h.2.mlp.deepspeed_moe.experts.deepspeed_experts.3."
    gate, up = moe.fc1_weight[3].chunk(2)
    assert torch.equal(state[e + "w2.weight"], gate) and torch.equal(state[e + "w1.weight"], up)
    assert torch.equal(state[e + "c_proj.weight"], moe.fc2_weight[3])


def test_model_prefixed_projector_and_tower_load_too(tmp_path):
    """If a Qwen checkpoint spelled the multimodal parts `model.` (as StableLM/Phi do), they still load."""
    from safetensors.torch import load_file, save_file
    model = write_tiny_checkpoint(tmp_path, "qwen")
    state = load_file(tmp_path / "model.safetensors")
    state = {k.replace("transformer.mm_projector.", "model.mm_projector.")
              .replace("transformer.image_tower.", "model.image_tower."): v for k, v in state.items()}
    save_file(state, tmp_path / "model.safetensors")
    ids, pixels = torch.tensor([[5, 6, -200, 7]]), torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(load_pretrained(tmp_path).model(ids, pixels).logits, model(ids, pixels).logits)


def test_stage3_upcycling_of_a_dense_qwen_is_exact():
    from moe_llava.train.upcycle import moe_config, upcycle
    dense = tiny_model("qwen", moe=False)
    moe = upcycle(dense, moe_config(dense.config, num_experts=4)).eval()
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)
