"""Official key layout: written sharded with an index, read back, wrong keys named, .bin only weights_only."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe_llava.checkpoint import read_state_dict
from moe_llava.loading import load_pretrained
from moe_llava.vision import KNOWN_TOWERS, resolve_tower
from runtime.errors import UserError
from tiny import TINY_CLIP, write_tiny_checkpoint

IDS = torch.tensor([[5, 6, -200, 7, 8, 9]])


def logits(model, pixels):
    with torch.no_grad():
        return model(IDS, pixels).logits


@pytest.mark.parametrize("family", ["stablelm", "phi"])
def test_sharded_official_layout_loads_back(tmp_path, family):
    model = write_tiny_checkpoint(tmp_path, family, max_shard_bytes=100_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    keys = set(index["weight_map"])
    assert len(set(index["weight_map"].values())) > 1
    assert "model.layers.0.mlp.deepspeed_moe.gate.wg.weight" in keys
    expert = "model.layers.2.mlp.deepspeed_moe.experts.deepspeed_experts.3."
    names = ["gate_proj.weight", "up_proj.weight", "down_proj.weight"] if family == "stablelm" else \
            ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert {expert + n for n in names} <= keys
    assert "model.layers.1.mlp." + names[0] in keys          # dense layers keep their plain MLP
    assert "model.mm_projector.image_spatial_proj.2.weight" in keys
    assert any(k.startswith("model.image_tower.image_tower.vision_model.") for k in keys)
    assert "lm_head.weight" in keys and "lm_head.bias" not in keys
    if family == "phi":
        assert "model.final_layernorm.weight" in keys
    loaded = load_pretrained(tmp_path)
    pixels = torch.randn(1, 3, 28, 28)
    assert torch.equal(logits(loaded.model, pixels), logits(model, pixels))


def test_expert_tensors_are_the_official_per_expert_weights(tmp_path):
    model = write_tiny_checkpoint(tmp_path)
    state = read_state_dict(tmp_path)
    moe = model.layers[2].mlp
    e = "model.layers.2.mlp.deepspeed_moe.experts.deepspeed_experts.1."
    gate, up = moe.fc1_weight[1].chunk(2)
    assert torch.equal(state[e + "gate_proj.weight"], gate) and torch.equal(state[e + "up_proj.weight"], up)
    assert torch.equal(state[e + "down_proj.weight"], moe.fc2_weight[1])


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    write_tiny_checkpoint(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["model.layers.0.mlp.deepspeed_moe.gate.wg.weight"]
    state["model.layers.0.mlp.surprise"] = torch.zeros(1)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(UserError) as err:
        load_pretrained(tmp_path)
    assert "missing (1): language_model.model.layers.0.mlp.router.weight" in str(err.value)
    assert "unexpected (1)" in str(err.value) and "surprise" in str(err.value)


def test_wrong_expert_count_is_reported(tmp_path):
    write_tiny_checkpoint(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["moe"]["num_experts"] = [8]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="wrong shape"):
        load_pretrained(tmp_path)


def test_pickled_bin_loads_only_tensors(tmp_path):
    model = write_tiny_checkpoint(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    torch.save(state, tmp_path / "pytorch_model.bin")
    pixels = torch.randn(1, 3, 28, 28)
    assert torch.equal(logits(load_pretrained(tmp_path).model, pixels), logits(model, pixels))

    class Payload:  # an arbitrary object must never be unpickled
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"x": Payload()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        read_state_dict(tmp_path)


def test_tower_from_local_directory_wins_over_embedded(tmp_path):
    """As the reference: mm_image_tower naming a local dir loads that tower, ignoring embedded weights."""
    from transformers import CLIPVisionConfig, CLIPVisionModel
    ckpt, tower_dir = tmp_path / "ckpt", tmp_path / "clip"
    model = write_tiny_checkpoint(ckpt)
    torch.manual_seed(7)
    other = CLIPVisionModel(CLIPVisionConfig(**{k: v for k, v in TINY_CLIP.items() if k != "model_type"}))
    other.save_pretrained(tower_dir)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["mm_image_tower"] = str(tower_dir)
    (ckpt / "config.json").write_text(json.dumps(cfg))
    loaded = load_pretrained(ckpt)
    got = loaded.model.vision_tower.model.state_dict()
    for key, value in other.state_dict().items():
        assert torch.equal(got[key], value), key
    embedded = model.vision_tower.model.state_dict()
    assert not torch.equal(got["embeddings.patch_embedding.weight"], embedded["embeddings.patch_embedding.weight"])


def test_known_hub_towers_resolve_offline_and_unknown_ones_fail():
    spec, directory = resolve_tower("openai/clip-vit-large-patch14-336", None, None, None)
    assert directory is None and spec is KNOWN_TOWERS["openai/clip-vit-large-patch14-336"]
    assert resolve_tower("google/siglip-so400m-patch14-384", None, None, None)[0].kind == "siglip"
    with pytest.raises(UserError, match="--vision-tower"):
        resolve_tower("someone/unknown-tower", None, None, None)


def test_missing_checkpoint_dir_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_pretrained(tmp_path / "nope")


def test_dense_stage2_checkpoint_loads(tmp_path):
    """A -Stage2 checkpoint: the reference's dense `llava_stablelm` type, plain MLPs, no moe dict."""
    model = write_tiny_checkpoint(tmp_path, "stablelm", moe=False, model_type="llava_stablelm")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.pop("moe")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = load_pretrained(tmp_path)
    assert loaded.model.moe_layers() == [] and loaded.template.value == "stablelm"
    pixels = torch.randn(1, 3, 28, 28)
    assert torch.equal(logits(loaded.model, pixels), logits(model, pixels))
