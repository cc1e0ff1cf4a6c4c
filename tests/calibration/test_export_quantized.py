"""export_quantized: calibration data errors come before the slow export; a failure leaves nothing behind."""
import pytest

from calibration import quantize
from runtime.errors import UserError


def test_bad_calib_data_fails_before_exporting(tiny_loaded, tmp_path, monkeypatch):
    monkeypatch.setattr("export.onnx_export.write_export", lambda *a, **k: pytest.fail("exported anyway"))
    with pytest.raises(UserError, match="does not exist"):
        quantize.export_quantized(tiny_loaded.directory, tmp_path / "out", "ort", "int8",
                                  calib_data=tmp_path / "missing.json", int8_scheme="static")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="holds no images"):
        quantize.export_quantized(tiny_loaded.directory, tmp_path / "out", "ort", "int8", calib_data=empty,
                                  int8_scheme="static")


def test_calib_data_without_calibration_is_refused(tiny_loaded, tmp_path, monkeypatch):
    monkeypatch.setattr("export.onnx_export.write_export", lambda *a, **k: pytest.fail("exported anyway"))
    for precision in ("int8", "int4"):
        with pytest.raises(UserError, match="needs no calibration data"):
            quantize.export_quantized(tiny_loaded.directory, tmp_path / "out", "ort", precision,
                                      calib_data=tmp_path)


def test_failed_quantisation_leaves_no_directory(tiny_loaded, tmp_path, monkeypatch):
    from moe_llava.data import draw_scene, sample_scene
    import numpy as np
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        draw_scene(sample_scene(np.random.default_rng(i))).save(images / f"{i}.png")

    def fake_export(loaded, directory, impl, precision):
        (directory / "decoder.onnx").write_bytes(b"half")

    def broken(*args, **kwargs):
        raise UserError("quantiser broke")
    monkeypatch.setattr("export.onnx_export.write_export", fake_export)
    monkeypatch.setattr(quantize, "quantize_export", broken)
    out = tmp_path / "exports" / "int8"
    with pytest.raises(UserError, match="quantiser broke"):
        quantize.export_quantized(tiny_loaded.directory, out, "portable", "int8", calib_data=images,
                                  calib=quantize.CalibConfig(min_tokens=1, min_samples=1, max_samples=3),
                                  int8_scheme="static")
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_plugin_lowering_is_sent_to_tensorrt(tiny_loaded, tmp_path):
    with pytest.raises(UserError, match="--target tensorrt"):
        quantize.export_quantized(tiny_loaded.directory, tmp_path / "out", "plugin", "int8")
