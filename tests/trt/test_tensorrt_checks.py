"""Pre-build checks (GPU, precision, lowering, TensorRT version) and the runtime's engines-section checks."""
from __future__ import annotations

import json

import pytest

from export.tensorrt_checks import (GpuTarget, check_moe_impl, check_precision, check_tensorrt_version,
                                    family_of, parse_version, resolve_gpu)
from runtime.errors import UserError
from runtime.tensorrt.engine_set import EngineSet

ORIN, HOPPER = (8, 7), (9, 0)


def test_fp8_is_refused_for_orin_with_a_way_out():
    for target in (resolve_gpu("orin", None), resolve_gpu("auto", ORIN, "Orin")):
        with pytest.raises(UserError, match=r"fp8 needs FP8 tensor cores.*Orin.*fp16, int8 and int4"):
            check_precision("fp8", target)
    check_precision("fp16", resolve_gpu("orin", None))
    check_precision("int8", resolve_gpu("orin", ORIN))
    check_precision("fp8", resolve_gpu("hopper", HOPPER))
    check_precision("fp8", resolve_gpu("thor", None))
    check_precision("fp8", GpuTarget(None, None))  # unknown GPU: TensorRT itself decides


def test_gpu_resolution():
    assert resolve_gpu("auto", ORIN, "Orin") == GpuTarget("orin", ORIN, "Orin", measured=True)
    assert resolve_gpu("auto", None) == GpuTarget(None, None)
    assert resolve_gpu("ORIN", None) == GpuTarget("orin", ORIN, "", measured=False)
    assert resolve_gpu("auto", (7, 5)).family is None and family_of((11, 0)) == "thor"
    with pytest.raises(UserError, match="expected auto or one of"):
        resolve_gpu("xavier", None)


def test_building_for_another_gpu_is_refused():
    with pytest.raises(UserError, match=r"--gpu orin .* SM 9\.0: TensorRT engines run only on the GPU they are "
                                        r"built on .*--from-onnx"):
        resolve_gpu("orin", HOPPER, "H100")


def test_ort_lowering_is_refused():
    with pytest.raises(UserError, match="com.microsoft.MoE.*--moe-impl plugin"):
        check_moe_impl("ort")
    check_moe_impl("plugin")
    check_moe_impl("portable")


def test_tensorrt_versions():
    assert parse_version("10.3.0.30") == (10, 3, 0) and parse_version("11.1") == (11, 1, 0)
    assert parse_version("10.16.0rc1") == (10, 16, 0)
    check_tensorrt_version("10.3.0.30")
    check_tensorrt_version("11.4.0.106")
    with pytest.raises(UserError, match="TensorRT 8.5.2.2 is too old.*JetPack 6"):
        check_tensorrt_version("8.5.2.2")


# ---- the runtime's view of the engines section --------------------------------------------------
def section(**overrides) -> dict:
    profile = {"name": "images", "shapes": {}}
    parts = {p: {"file": f"{p}.engine", "profiles": [profile]} for p in ("vision", "projector", "embed")}
    parts["decoder"] = {"file": "decoder.engine", "profiles": [{"name": "prefill", "shapes": {}},
                                                               {"name": "decode", "shapes": {}}]}
    d = {"format": 1, "tensorrt_version": "10.3.0.30", "parts": parts, "plugin": "libmoe_llava_plugin.so",
         "gpu": {"family": "orin", "name": "Orin", "compute_capability": "8.7"}, "max_batch": 1, "max_seq": 64,
         "workspace_mb": 1024}
    d.update(overrides)
    return d


def engine_dir(tmp_path, d: dict, files=("vision", "projector", "embed", "decoder"), plugin=True):
    for name in files:
        (tmp_path / f"{name}.engine").write_bytes(b"plan")
    if plugin:
        (tmp_path / "libmoe_llava_plugin.so").write_bytes(b"\x7fELF")
    return EngineSet.from_dict(tmp_path, json.loads(json.dumps(d)))


def test_engine_set_parses_and_passes_on_the_same_device(tmp_path):
    engines = engine_dir(tmp_path, section())
    assert engines.profile_index("decoder", "decode") == 1 and engines.max_seq == 64
    assert engines.path("decoder") == tmp_path / "decoder.engine"
    assert engines.plugin_path() == tmp_path / "libmoe_llava_plugin.so"
    assert engines.extra == {"workspace_mb": 1024}
    engines.check_files(engines.plugin_path())
    engines.check_compatible("10.3.0.30", ORIN, "Orin")
    engines.check_compatible("10.3.0.31", None)  # same release, unknown GPU


def test_engine_files_and_plugin_must_exist(tmp_path):
    engines = engine_dir(tmp_path, section(), files=("vision", "projector", "embed"), plugin=False)
    with pytest.raises(UserError, match=r"missing decoder.engine \(decoder\), .*libmoe_llava_plugin.so"):
        engines.check_files(engines.plugin_path())


def test_plugin_override_from_the_environment(tmp_path, monkeypatch):
    engines = engine_dir(tmp_path, section())
    monkeypatch.setenv("MOE_LLAVA_PLUGIN", "/opt/plugins/libmoe_llava_plugin.so")
    assert str(engines.plugin_path()) == "/opt/plugins/libmoe_llava_plugin.so"
    assert engines.plugin_path("/x/lib.so").name == "lib.so"  # an explicit argument wins


def test_engines_from_another_tensorrt_or_gpu_are_refused(tmp_path):
    engines = engine_dir(tmp_path, section())
    with pytest.raises(UserError, match=r"built with TensorRT 10.3.0.30, this is 10.16.0.1; rebuild them here"):
        engines.check_compatible("10.16.0.1", ORIN)
    with pytest.raises(UserError, match=r"built for SM 8.7 \(Orin\), this GPU H100 is SM 9.0"):
        engines.check_compatible("10.3.0.30", HOPPER, "H100")


@pytest.mark.parametrize("edit, message", [
    (dict(format=2), "format 2 is not 1"),
    (dict(tensorrt_version=None, parts=None), "malformed"),
    (dict(parts={"decoder": {"file": "d.engine", "profiles": [{"name": "prefill"}, {"name": "decode"}]}}),
     r"parts \['vision', 'projector', 'embed'\] missing"),
])
def test_malformed_sections(tmp_path, edit, message):
    with pytest.raises(UserError, match=message):
        EngineSet.from_dict(tmp_path, section(**edit))


def test_decoder_needs_both_profiles(tmp_path):
    d = section()
    d["parts"]["decoder"]["profiles"] = [{"name": "prefill", "shapes": {}}]
    with pytest.raises(UserError, match="needs profiles 'prefill' and 'decode'"):
        EngineSet.from_dict(tmp_path, d)
