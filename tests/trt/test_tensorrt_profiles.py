"""Optimisation-profile shape plans from the manifest (export/tensorrt_profiles.py), and that the runtime's
decoder bindings always fall inside them. No TensorRT needed."""
from __future__ import annotations

import json

import numpy as np
import pytest

from export.tensorrt_profiles import (BuildLimits, Profile, ShapeRange, check_profiles,  # noqa: E402
                                      image_feature_dims, plan_profiles, profiles_to_dict)
from rt_helpers import HEAD_DIM, HIDDEN, KVH, PATCHES, VISION_DIM, build_tiny_export  # noqa: E402
from runtime.errors import UserError  # noqa: E402
from runtime.manifest import Manifest  # noqa: E402
from runtime.tensorrt.kv_layout import ALIGNMENT, DecoderBuffers, KVLayout, decoder_bindings, position_table  # noqa: E402

LAYERS = 2


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    build_tiny_export(out, num_layers=LAYERS, max_positions=512)
    return Manifest.load(out)


def test_decoder_has_prefill_and_decode_covering_every_input(manifest):
    plan = plan_profiles(manifest, BuildLimits(max_batch=2, max_seq=64))
    prefill, decode = plan["decoder"]
    assert (prefill.name, decode.name) == ("prefill", "decode")
    inputs = set(manifest.decoder.io_names()[0])
    assert set(prefill.shapes) == set(decode.shapes) == inputs
    assert {"past_key_values.0.key", "past_key_values.1.value"} <= inputs
    p = prefill.shapes
    assert p["inputs_embeds"] == ShapeRange((1, 1, HIDDEN), (1, min(64, PATCHES + 64), HIDDEN), (2, 64, HIDDEN))
    assert p["attention_mask"].max == (2, 64) and p["position_ids"].max == (2, 64)
    assert p["past_key_values.1.value"] == ShapeRange((1, KVH, 0, HEAD_DIM), (1, KVH, 0, HEAD_DIM),
                                                      (2, KVH, 0, HEAD_DIM))  # prefill starts a new cache
    d = decode.shapes
    assert d["inputs_embeds"] == ShapeRange((1, 1, HIDDEN), (1, 1, HIDDEN), (2, 1, HIDDEN))
    assert d["past_key_values.0.key"].min == (1, KVH, 0, HEAD_DIM)
    assert d["past_key_values.0.key"].max == (2, KVH, 63, HEAD_DIM)  # past + 1 new <= max_seq
    assert d["attention_mask"] == ShapeRange((1, 1), (1, d["past_key_values.0.key"].opt[2] + 1), (2, 64))


def test_opt_shapes_stay_inside_small_limits(manifest):
    prefill, decode = plan_profiles(manifest, BuildLimits(max_seq=3))["decoder"]
    assert prefill.shapes["inputs_embeds"].opt == (1, 3, HIDDEN)
    assert decode.shapes["past_key_values.0.key"].opt == (1, KVH, 2, HEAD_DIM)


def test_vision_projector_embed(manifest):
    plan = plan_profiles(manifest, BuildLimits(max_batch=3, max_seq=100))
    (vision,), (projector,), (embed,) = plan["vision"], plan["projector"], plan["embed"]
    assert vision.shapes["pixel_values"] == ShapeRange((1, 3, 8, 8), (1, 3, 8, 8), (3, 3, 8, 8))
    assert projector.shapes["image_features"] == ShapeRange((1, PATCHES, VISION_DIM), (1, PATCHES, VISION_DIM),
                                                            (3, PATCHES, VISION_DIM))
    assert embed.shapes["input_ids"] == ShapeRange((1, 1), (1, 1), (3, 100))  # opt: decode's one token
    assert image_feature_dims(manifest) == (PATCHES, VISION_DIM)


def test_limits_are_checked(manifest):
    prefill, _ = plan_profiles(manifest, BuildLimits(max_seq=1024))["decoder"]  # capped at the model's 512
    assert prefill.shapes["attention_mask"].max == (1, 512)
    assert BuildLimits(2, 1024).fit(manifest.decoder) == BuildLimits(2, 512)
    with pytest.raises(UserError, match="--max-batch must be at least 1"):
        BuildLimits(max_batch=0)
    with pytest.raises(UserError, match="--max-seq must be at least 2"):
        BuildLimits(max_seq=1)


def test_static_dims_must_agree_with_the_graph(manifest):
    (vision,) = plan_profiles(manifest, BuildLimits())["vision"]
    wrong = Profile("images", {"pixel_values": ShapeRange((1, 3, 9, 8), (1, 3, 9, 8), (1, 3, 9, 8))})
    with pytest.raises(UserError, match="axis 2 is 8 in the graph but planned 9..9"):
        check_profiles("vision", manifest.parts["vision"], (wrong,))
    with pytest.raises(UserError, match="covers"):
        check_profiles("vision", manifest.parts["vision"], (Profile("images", {}),))
    check_profiles("vision", manifest.parts["vision"], (vision,))


def test_shape_range_rejects_inverted_ranges():
    with pytest.raises(ValueError, match="min <= opt <= max"):
        ShapeRange((1, 4), (1, 2), (1, 8))
    with pytest.raises(ValueError, match="ranks differ"):
        ShapeRange((1,), (1, 2), (1, 8))


def test_profiles_round_trip_through_json(manifest):
    plan = plan_profiles(manifest, BuildLimits(max_seq=32))
    raw = json.loads(json.dumps(profiles_to_dict(plan)))
    assert tuple(Profile.from_dict(p) for p in raw["decoder"]) == plan["decoder"]


@pytest.mark.parametrize("max_seq", [2, 7, 64])
def test_runtime_bindings_stay_inside_the_profiles(manifest, max_seq):
    """Every shape TrtEngine's decoder binds (prefill of 1..M, then decode up to M) is inside the profile it
    runs on, and binds exactly the graph's inputs - the builder and the runtime agree on the plan."""
    prefill, decode = plan_profiles(manifest, BuildLimits(max_seq=max_seq))["decoder"]
    layout = KVLayout(LAYERS, KVH, HEAD_DIM, max_seq, 4)
    buffers = DecoderBuffers(embeds=1 << 20, mask=2 << 20, positions=3 << 20, position_table=6 << 20,
                             logits=4 << 20, kv=5 << 20)
    inputs, outputs = manifest.decoder.io_names()
    for prompt in sorted({1, max_seq // 2 or 1, max_seq - 1}):
        shapes, addresses = decoder_bindings(layout, buffers, HIDDEN, 0, prompt, 0)
        assert set(shapes) == set(inputs) and set(addresses) == set(inputs) | set(outputs)
        assert all(prefill.shapes[n].contains(s) for n, s in shapes.items()), shapes
        for cached in range(prompt, max_seq):
            shapes, addresses = decoder_bindings(layout, buffers, HIDDEN, cached, 1, cached % 2)
            assert all(decode.shapes[n].contains(s) for n, s in shapes.items()), (cached, shapes)
            assert all(a % ALIGNMENT == 0 for a in addresses.values())  # TensorRT's requirement


def test_kv_ping_pong_addresses_never_overlap():
    layout = KVLayout(num_layers=3, num_kv_heads=2, head_dim=4, max_len=10, itemsize=2)
    assert layout.slot_bytes == 256 >= 2 * 10 * 4 * 2 and layout.nbytes == 2 * 3 * 2 * layout.slot_bytes
    offsets = sorted(layout.offset(side, layer, kind) for side in (0, 1) for layer in range(3) for kind in (0, 1))
    assert offsets == [i * layout.slot_bytes for i in range(12)]  # disjoint aligned slots tiling the block
    buffers = DecoderBuffers(0, 0, positions=1024, position_table=4096, logits=0, kv=10_240)
    shapes, addresses = decoder_bindings(layout, buffers, 8, cached=5, new=1, side=1)
    assert addresses["position_ids"] == 4096 + 5 * ALIGNMENT  # slot 5 of the table holds 5
    assert decoder_bindings(layout, buffers, 8, cached=0, new=3, side=0)[1]["position_ids"] == 1024  # arange[:3]
    with pytest.raises(ValueError, match="only prefill or single-position decode"):
        decoder_bindings(layout, buffers, 8, cached=2, new=2, side=0)
    assert shapes["past_key_values.2.value"] == (1, 2, 5, 4) and shapes["attention_mask"] == (1, 6)
    assert addresses["past_key_values.2.value"] == 10_240 + layout.offset(1, 2, 1)
    assert addresses["present.2.value"] == 10_240 + layout.offset(0, 2, 1)
    past_end = addresses["past_key_values.0.key"] + int(np.prod(shapes["past_key_values.0.key"])) * 2
    assert past_end <= addresses["past_key_values.0.key"] + layout.slot_bytes


def test_position_table_rows_are_aligned_scalars():
    table = position_table(5, np.int64)
    assert table.shape == (5, ALIGNMENT // 8) and table.nbytes == 5 * ALIGNMENT
    assert list(table[:, 0]) == [0, 1, 2, 3, 4] and not table[:, 1:].any()
