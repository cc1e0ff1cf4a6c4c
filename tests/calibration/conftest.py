"""Shared fixtures: a tiny StableLM checkpoint (2 layers: MoE, dense), a small synthetic set, its calibration set;
the slow tests add one fp32 export per MoE lowering, quantised from there (one torch export each)."""
import pytest

from calib_helpers import SMALL_SET
from tiny import write_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_loaded(tmp_path_factory):
    from moe_llava.loading import load_pretrained
    directory = tmp_path_factory.mktemp("calib_ckpt") / "stablelm"
    write_tiny_checkpoint(directory, "stablelm", num_hidden_layers=2)
    return load_pretrained(directory)


@pytest.fixture(scope="session")
def small_set(tmp_path_factory, monkeypatch_session):
    """The synthetic set, generated into a private cache (MOE_LLAVA_CACHE) so the tests touch no user cache."""
    from calibration.data import synthetic_dataset
    monkeypatch_session.setenv("MOE_LLAVA_CACHE", str(tmp_path_factory.mktemp("cache")))
    return synthetic_dataset(SMALL_SET)


@pytest.fixture(scope="session")
def monkeypatch_session():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="session")
def calib_set(tiny_loaded, small_set):
    from calibration.calibset import CalibConfig, select_by_coverage
    from calibration.data import samples_from_llava_json
    samples = samples_from_llava_json(small_set.instruct_json, tiny_loaded.template)
    return select_by_coverage(tiny_loaded, samples, CalibConfig(min_tokens=8, min_samples=8, max_samples=24),
                              progress=False)


@pytest.fixture(scope="session")
def fp32_exports(tiny_loaded, tmp_path_factory):
    """{impl: fp32 export dir} of the tiny checkpoint (write_export, no validation)."""
    from export.moe_lowering import MoEImpl
    from export.onnx_export import write_export
    from export.precision import Precision
    root = tmp_path_factory.mktemp("fp32_exports")
    dirs = {}
    for impl in ("ort", "portable"):
        dirs[impl] = root / impl
        dirs[impl].mkdir()
        write_export(tiny_loaded, dirs[impl], MoEImpl(impl), Precision.FP32)
    return dirs
