"""-384 variants: SigLIP so400m-patch14-384 towers (built-in config, embedded weights, the patch-drop quirk,
the SigLIP processor)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import SiglipImageProcessorPil, SiglipVisionConfig, SiglipVisionModel

from moe_llava import vision
from moe_llava.torch_engine import TorchEngine
from moe_llava.image_processing import HFImageProcessor, expand_to_square
from moe_llava.loading import load_pretrained, save_pretrained
from moe_llava.vision import KNOWN_TOWERS, TowerSpec, VisionTower
from runtime.generation import Pipeline
from runtime.preprocess import SIGLIP_384, ImageSpec, preprocess
from tiny import TINY_SIGLIP, TINY_SIGLIP_PROCESSOR, tiny_model, tiny_tokenizer

SIGLIP_ID = "google/siglip-so400m-patch14-384"


def test_patch_selection_drops_index_0_though_siglip_has_no_cls():
    """P = (S/patch)^2 - 1: layer -2's hidden states without position 0, a real patch (the reference's quirk)."""
    model = tiny_model(tower="siglip")
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        features = model.vision_tower(pixels)
        hidden = model.vision_tower.model(pixels, output_hidden_states=True).hidden_states[-2]
    assert hidden.shape[1] == (28 // 7) ** 2 == 16                 # no CLS token in SigLIP
    assert features.shape == (2, 15, 32)
    assert torch.equal(features, hidden[:, 1:])


def test_builtin_so400m_384_config_gives_728_tokens():
    """Built on the meta device from the built-in config: 27 layers of width 1152, 729 patches -> 728 tokens."""
    spec = KNOWN_TOWERS[SIGLIP_ID]
    with torch.device("meta"):
        tower = VisionTower(spec)
        features = tower(torch.empty(1, 3, 384, 384))
    assert spec.kind == "siglip" and isinstance(tower.model, SiglipVisionModel)
    assert features.shape == (1, (384 // 14) ** 2 - 1, 1152) == (1, 728, 1152)
    params = sum(p.numel() for p in tower.model.parameters())
    assert params == pytest.approx(428e6, rel=0.01)                # "so400m": the vision half of SigLIP so400m


# vision_config of google/siglip-so400m-patch14-384's config.json, transcribed: the keys the release sets;
# the rest are transformers' SiglipVisionConfig defaults, in the release as in ours
RELEASED_SO400M_VISION = dict(hidden_size=1152, image_size=384, intermediate_size=4304, num_attention_heads=16,
                              num_hidden_layers=27, patch_size=14)


def test_builtin_config_equals_the_released_one():
    """Our built-in tower config, completed by transformers' defaults, is the released config completed the same way."""
    ours = SiglipVisionConfig(**KNOWN_TOWERS[SIGLIP_ID].config).to_dict()
    released = SiglipVisionConfig(**RELEASED_SO400M_VISION).to_dict()
    differing = {k: (ours.get(k), released.get(k)) for k in ours.keys() | released.keys()
                 if ours.get(k) != released.get(k) and k not in ("transformers_version", "_name_or_path")}
    assert differing == {}


def test_hub_named_siglip_checkpoint_loads_offline_and_generates(tmp_path, monkeypatch):
    """A -384 checkpoint names the hub tower and embeds its weights: it loads with no hub, through the
    built-in config (shrunk here to the tiny tower), and generates what the saved model generates."""
    monkeypatch.setitem(vision.KNOWN_TOWERS, SIGLIP_ID, TowerSpec("siglip", TINY_SIGLIP, TINY_SIGLIP_PROCESSOR))
    model = tiny_model(tower="siglip", seed=2)
    model.config.mm_image_tower = SIGLIP_ID
    model.config.image_tower_config = model.config.image_processor_config = None
    tiny_tokenizer(tmp_path / "_tok")
    save_pretrained(model, tmp_path, tmp_path / "_tok")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["mm_image_tower"] == SIGLIP_ID and "image_tower_config" not in config
    loaded = load_pretrained(tmp_path)
    assert loaded.model.vision_tower.spec is vision.KNOWN_TOWERS[SIGLIP_ID]
    assert loaded.image_processor.spec.pad_color == (127, 127, 127)
    for key, value in model.vision_tower.state_dict().items():
        assert torch.equal(loaded.model.vision_tower.state_dict()[key], value), key
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 36, 3), dtype=np.uint8))

    def generate(m):
        pipe = Pipeline(TorchEngine(m), loaded.tokenizer, loaded.template, loaded.image_processor.spec,
                        loaded.eos_token_id, preprocess=loaded.image_processor)
        return pipe.generate(image, "What is in the image?", max_new_tokens=8)
    got, want = generate(loaded.model), generate(model)
    assert got.prompt_tokens == want.prompt_tokens and got.token_ids == want.token_ids
    assert len(got.token_ids) > 0


@pytest.mark.parametrize("size", [(500, 300), (300, 500), (384, 384), (97, 31)])
def test_siglip_384_processor_equals_transformers_after_pad(size):
    """Pad to a square of (127,127,127) = int(0.5*255), then transformers' SiglipImageProcessor: exact 384x384
    bicubic resize (no crop), rescale, mean = std = 0.5. Our PyTorch-side processor and the runtime's numpy
    port both give exactly its pixels."""
    processor_config = KNOWN_TOWERS[SIGLIP_ID].processor
    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    hf = SiglipImageProcessorPil(**{k: v for k, v in processor_config.items() if k != "image_processor_type"})
    want = hf(images=expand_to_square(image, (127, 127, 127)), return_tensors="np")["pixel_values"][0]
    spec = ImageSpec.from_hf_processor_config(processor_config)
    assert spec == SIGLIP_384 and spec.pad_color == (127, 127, 127) and spec.size == (384, 384)
    assert want.shape == (3, 384, 384)
    np.testing.assert_array_equal(HFImageProcessor(processor_config)(image), want)
    np.testing.assert_array_equal(preprocess(image, spec), want)
    if size[0] > size[1]:  # wide: the top rows are the pad colour, normalised
        np.testing.assert_allclose(want[:, 0, 0], (127 / 255 - 0.5) / 0.5, atol=1e-6)
