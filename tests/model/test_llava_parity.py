"""A dense (no MoE) MoE-LLaVA equals transformers' LlavaForConditionalGeneration with the same weights."""
import pytest
import torch
from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, PhiConfig, StableLmConfig

from tiny import TINY_CLIP, VOCAB, tiny_model

IMAGE_ID = VOCAB - 1  # Llava wants a real vocabulary id repeated P times where we use one -200 slot


# The tiny text backbones of tests/tiny.py written directly in transformers' names (rope_pct ->
# partial_rotary_factor, norm_eps -> layer_norm_eps), not through the project's hf_config translation.
TEXT_CONFIGS = {
    "stablelm": lambda: StableLmConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                       num_attention_heads=4, num_key_value_heads=4, hidden_act="silu",
                                       partial_rotary_factor=0.25, rope_theta=10000, layer_norm_eps=1e-5,
                                       use_qkv_bias=True, max_position_embeddings=512, tie_word_embeddings=False,
                                       bos_token_id=None, eos_token_id=0),
    "phi": lambda: PhiConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                             num_attention_heads=4, hidden_act="gelu_new", partial_rotary_factor=0.5,
                             rope_theta=10000, layer_norm_eps=1e-5, max_position_embeddings=512, qk_layernorm=False,
                             resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, tie_word_embeddings=False,
                             bos_token_id=None, eos_token_id=0),
}


def llava_from(ours, family: str) -> LlavaForConditionalGeneration:
    text = TEXT_CONFIGS[family]()
    vision = CLIPVisionConfig(**{k: v for k, v in TINY_CLIP.items() if k != "model_type"})
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_ID,
                         projector_hidden_act="gelu", vision_feature_layer=-2,
                         vision_feature_select_strategy="default")
    llava = LlavaForConditionalGeneration(config).eval()
    renamed = {}
    for key, value in ours.state_dict().items():
        key = (key.replace("vision_tower.model.", "model.vision_tower.")
                  .replace("projector.0.", "model.multi_modal_projector.linear_1.")
                  .replace("projector.2.", "model.multi_modal_projector.linear_2.")
                  .replace("language_model.model.", "model.language_model.")
                  .replace("language_model.lm_head.", "lm_head."))
        renamed[key] = value
    missing, unexpected = llava.load_state_dict(renamed, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    return llava


@pytest.mark.parametrize("family", ["stablelm", "phi"])
def test_dense_model_matches_transformers_llava(family):
    ours = tiny_model(family, moe=False)
    llava = llava_from(ours, family)
    pixels = torch.randn(1, 3, 28, 28)
    patches = ours.vision_tower(pixels).shape[1]
    before, after = [11, 12, 13], [14, 15, 16, 17]
    with torch.no_grad():
        got = ours(torch.tensor([before + [-200] + after]), pixels).logits
        want = llava(input_ids=torch.tensor([before + [IMAGE_ID] * patches + after]), pixel_values=pixels).logits
    assert got.shape == want.shape
    # same modules, same weights, same order of operations: equal up to fp32 reassociation
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
