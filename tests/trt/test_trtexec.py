"""The printed trtexec command lines (export/tensorrt_trtexec.py)."""
from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from export.tensorrt_profiles import BuildLimits, plan_profiles  # noqa: E402
from export.tensorrt_trtexec import format_command, shape_spec, trtexec_command  # noqa: E402
from rt_helpers import build_tiny_export  # noqa: E402
from runtime.manifest import Manifest  # noqa: E402


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    build_tiny_export(out, num_layers=2)
    return plan_profiles(Manifest.load(out), BuildLimits(max_batch=1, max_seq=128))


def test_decoder_command_has_two_profiles_plugin_and_limits(plan):
    argv = trtexec_command(Path("out/decoder.onnx"), Path("out/decoder.engine"), plan["decoder"],
                           plugin=Path("out/libmoe_llava_plugin.so"), workspace_mb=1536,
                           timing_cache=Path("cache/timing.cache"))
    assert argv[:5] == ["trtexec", "--onnx=out/decoder.onnx", "--saveEngine=out/decoder.engine",
                        "--stronglyTyped", "--skipInference"]
    assert "--dynamicPlugins=out/libmoe_llava_plugin.so" in argv
    assert "--memPoolSize=workspace:1536M" in argv and "--timingCacheFile=cache/timing.cache" in argv
    assert argv.index("--profile=0") < argv.index("--profile=1")
    after = argv[argv.index("--profile=1") + 1:]
    assert [a.split("=")[0] for a in after[:3]] == ["--minShapes", "--optShapes", "--maxShapes"]
    max_decode = after[2]
    assert "inputs_embeds:1x1x8" in max_decode and "attention_mask:1x128" in max_decode
    assert "past_key_values.1.value:1x2x127x4" in max_decode  # past up to max_seq - 1
    min_prefill = argv[argv.index("--profile=0") + 1]
    assert "past_key_values.0.key:1x2x0x4" in min_prefill  # an empty past prints as a 0 axis


def test_single_profile_parts_have_no_profile_index(plan):
    argv = trtexec_command(Path("vision.onnx"), Path("vision.engine"), plan["vision"])
    assert not any(a.startswith("--profile") for a in argv)
    assert not any("Plugins" in a or "memPoolSize" in a for a in argv)
    assert "--maxShapes=pixel_values:1x3x8x8" in argv


def test_static_plugin_variant_and_quoting(plan):
    argv = trtexec_command(Path("my dir/embed.onnx"), Path("e.engine"), plan["embed"],
                           plugin=Path("p.so"), static_plugin=True)
    assert "--staticPlugins=p.so" in argv
    line = format_command(argv)
    assert shlex.split(line) == argv and "'--onnx=my dir/embed.onnx'" in line
    assert shape_spec(plan["embed"][0], "max") == "input_ids:1x128"
