"""Released-shape presets and the random checkpoint writer: exact sizes, init rules, streaming, determinism."""
import json
import math

import pytest
import torch

from moe_llava.loading import load_pretrained
from moe_llava.random_checkpoint import official_shapes, random_tensor, write_random_checkpoint
from moe_llava.released import ReleasedPreset, released_config
from moe_llava.weight_files import WeightFiles
from tiny import tiny_config, tiny_tokenizer

# parameters with the embedded tower: the paper's LM figures (2.9B / 5.3B / 3.1B total) + CLIP-L 0.30B
TOTALS = {ReleasedPreset.STABLELM_4E: 3_200_124_928, ReleasedPreset.PHI2_4E: 5_609_680_896,
          ReleasedPreset.QWEN_4E: 3_364_126_720}


@pytest.mark.parametrize("preset", list(TOTALS))
def test_released_shapes_have_the_released_sizes(preset):
    shapes = official_shapes(released_config(preset))
    assert sum(math.prod(s) for s in shapes.values()) == TOTALS[preset]
    assert all(k.startswith(("model.", "lm_head.", "transformer.")) for k in shapes)  # official layout
    experts = [k for k in shapes if ".deepspeed_experts.3." in k]
    assert len({k.split(".")[2] for k in experts}) == released_config(preset).num_layers // 2


def test_siglip_variant_embeds_the_so400m_tower():
    shapes = official_shapes(released_config(ReleasedPreset.STABLELM_4E_384))
    assert shapes["model.mm_projector.image_spatial_proj.0.weight"] == (2048, 1152)
    assert any(".encoder.layers.26." in k for k in shapes)  # 27 SigLIP layers


def test_random_values_follow_the_init_rules_and_the_name_only():
    a = random_tensor("model.layers.0.mlp.deepspeed_moe.gate.wg.weight", (4, 2048), seed=0, std=0.02)
    assert a.dtype == torch.float16 and a.float().std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.equal(a, random_tensor("model.layers.0.mlp.deepspeed_moe.gate.wg.weight", (4, 2048), 0, 0.02))
    assert not torch.equal(a, random_tensor("model.layers.2.mlp.deepspeed_moe.gate.wg.weight", (4, 2048), 0, 0.02))
    assert torch.all(random_tensor("model.norm.weight", (8,), 0, 0.02) == 1)
    assert torch.all(random_tensor("model.norm.bias", (8,), 0, 0.02) == 0)


def test_written_checkpoint_is_sharded_fp16_and_loads(tmp_path):
    config = tiny_config("stablelm")
    write_random_checkpoint(tmp_path, config, shard_bytes=50_000)
    tiny_tokenizer(tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    with WeightFiles(tmp_path) as files:
        assert {files.meta(n).dtype for n in files.names} == {torch.float16}
        assert index["metadata"]["total_size"] == sum(files.nbytes(n) for n in files.names)
    model = load_pretrained(tmp_path, dtype="fp32").model
    routers = torch.stack([m.router.weight for m in model.moe_layers()])
    assert routers.dtype == torch.float32 and routers.std().item() > 0.01
