"""Calibration sources: LLaVA-JSON (images relative to the file), an image folder with default prompts."""
import json

import numpy as np
import pytest

from calibration.data import DEFAULT_PROMPTS, load_samples, samples_from_folder
from calibration.readers import part_feeds, stacked
from moe_llava.data import draw_scene, sample_scene
from runtime.errors import UserError
from runtime.prompt import IMAGE_PLACEHOLDER, Template


def scenes(folder, n):
    folder.mkdir()
    for i in range(n):
        draw_scene(sample_scene(np.random.default_rng(i))).save(folder / f"{i}.png")


def test_image_folder_gets_the_default_prompts(tmp_path):
    scenes(tmp_path / "imgs", 3)
    samples = samples_from_folder(tmp_path / "imgs")
    assert [s.image.name for s in samples] == ["0.png", "1.png", "2.png"]
    assert [s.turns[0].question for s in samples] == [f"{IMAGE_PLACEHOLDER}\n{p}" for p in DEFAULT_PROMPTS[:3]]


def test_llava_json_images_are_relative_to_the_file(tmp_path):
    scenes(tmp_path / "imgs", 1)
    records = [{"id": "a", "image": "imgs/0.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                                     {"from": "gpt", "value": "A circle."}]},
               {"id": "t", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}]
    (tmp_path / "calib.json").write_text(json.dumps(records))
    samples = load_samples(tmp_path / "calib.json", Template.STABLELM)
    assert samples[0].image == tmp_path / "imgs" / "0.png" and samples[0].turns[0].answer == "A circle."
    assert samples[1].image is None
    records[0]["image"] = "imgs/missing.png"
    (tmp_path / "calib.json").write_text(json.dumps(records))
    with pytest.raises(UserError, match="relative to the JSON file's folder"):
        load_samples(tmp_path / "calib.json", Template.STABLELM)


def manifest_like(loaded):
    """What part_feeds reads from a Manifest, without exporting anything."""
    from types import SimpleNamespace

    from export.parts import kv_geometry
    from runtime.manifest import DecoderSpec, PartSpec, TensorSpec
    cfg = loaded.config
    kv_heads, head_dim = kv_geometry(loaded.model)
    decoder = DecoderSpec(cfg.num_layers, kv_heads, head_dim, cfg.hidden_size, cfg.vocab_size, 512)
    embeds = TensorSpec("inputs_embeds", ("batch", "sequence", cfg.hidden_size), "float32")
    return SimpleNamespace(decoder=decoder, parts={"decoder": PartSpec("decoder.onnx", (embeds,), ())},
                           kv_cache="float")


def test_feeds_per_part(calib_set, tiny_loaded):
    spec = manifest_like(tiny_loaded)
    decoder = part_feeds(spec, "decoder", calib_set.samples)
    assert len(decoder) == len(calib_set.samples)
    first = decoder[0]
    assert first["inputs_embeds"].shape[1] == first["attention_mask"].shape[1] == first["position_ids"].shape[1]
    assert first["past_key_values.0.key"].shape[2] == 0
    arrays = stacked(decoder)
    assert arrays["inputs_embeds"].shape[0] == len(decoder)
    assert arrays["inputs_embeds"].shape[1] == min(f["inputs_embeds"].shape[1] for f in decoder)
    vision = part_feeds(spec, "vision", calib_set.samples)
    assert 0 < len(vision) <= len(calib_set.samples) and vision[0]["pixel_values"].ndim == 4
