"""A dense (no MoE) MoE-LLaVA equals transformers' LlavaForConditionalGeneration with the same weights."""
import pytest
import torch
from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

from moe_llava.backbones import backbone_for
from tiny import TINY_CLIP, VOCAB, tiny_model

IMAGE_ID = VOCAB - 1  # Llava wants a real vocabulary id repeated P times where we use one -200 slot


def llava_from(ours) -> LlavaForConditionalGeneration:
    text = backbone_for(ours.config).hf_config(ours.config.backbone)
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
    llava = llava_from(ours)
    pixels = torch.randn(1, 3, 28, 28)
    patches = ours.vision_tower(pixels).shape[1]
    before, after = [11, 12, 13], [14, 15, 16, 17]
    with torch.no_grad():
        got = ours(torch.tensor([before + [-200] + after]), pixels).logits
        want = llava(input_ids=torch.tensor([before + [IMAGE_ID] * patches + after]), pixel_values=pixels).logits
    assert got.shape == want.shape
    # same modules, same weights, same order of operations: equal up to fp32 reassociation
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
