import json

import torch
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModel, StableLmConfig, StableLmForCausalLM

from moe_llava.train.init import from_parts, is_llava_dir
from tests.tiny import TINY_CLIP, VOCAB


def test_stage1_init_from_a_plain_llm_and_a_clip_dir(tmp_path):
    torch.manual_seed(0)
    llm = StableLmForCausalLM(StableLmConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                             num_hidden_layers=2, num_attention_heads=4, eos_token_id=0))
    llm.save_pretrained(tmp_path / "llm")
    clip = CLIPVisionModel(CLIPVisionConfig(**{k: v for k, v in TINY_CLIP.items() if k != "model_type"}))
    (tmp_path / "clip").mkdir()
    clip.config.to_json_file(tmp_path / "clip" / "config.json")
    save_file(clip.state_dict(), tmp_path / "clip" / "model.safetensors")
    assert not is_llava_dir(tmp_path / "llm")

    model = from_parts(tmp_path / "llm", tmp_path / "clip", model_max_length=128)
    assert model.config.model_type == "moe_llava_stablelm" and not model.config.moe.enable
    assert model.config.mm_hidden_size == 32 and model.model_max_length == 128
    for name, tensor in llm.state_dict().items():
        assert torch.equal(model.language_model.state_dict()[name], tensor), name
    vision = model.vision_tower.model.state_dict()
    assert all(torch.equal(vision[k], v) for k, v in clip.state_dict().items())
    assert json.loads(json.dumps(model.config.to_dict()))["mm_image_tower"].endswith("clip")
