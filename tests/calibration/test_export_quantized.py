"""export_quantized: bad input fails cleanly; a failure leaves nothing behind."""
import pytest

from calibration import quantize
from runtime.errors import UserError


def test_bad_calib_data_is_named(tiny_loaded, tmp_path):
    """--calib-data (read by --target tensorrt's ModelOpt calibration) fails with one clear error."""
    from calibration.data import load_samples
    with pytest.raises(UserError, match="does not exist"):
        load_samples(tmp_path / "missing.json", tiny_loaded.template)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="holds no images"):
        load_samples(empty, tiny_loaded.template)


def test_calib_data_is_refused_for_weight_only_exports(tiny_loaded, tmp_path, capsys):
    import cli
    from cli_helpers import run_cli
    code, _, err = run_cli(cli.export_main, ["--model", str(tiny_loaded.directory), "--precision", "int4",
                                             "--calib-data", str(tmp_path), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "need no calibration data" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_failed_quantisation_leaves_no_directory(tiny_loaded, tmp_path, monkeypatch):
    def fake_export(loaded, directory, impl, precision, attention=None):
        (directory / "decoder.onnx").write_bytes(b"half")

    def broken(*args, **kwargs):
        raise UserError("quantiser broke")
    monkeypatch.setattr("export.onnx_export.write_export", fake_export)
    monkeypatch.setattr(quantize, "quantize_export", broken)
    out = tmp_path / "exports" / "int8"
    with pytest.raises(UserError, match="quantiser broke"):
        quantize.export_quantized(tiny_loaded.directory, out, "portable", "int8")
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_plugin_lowering_is_sent_to_tensorrt(tiny_loaded, tmp_path):
    with pytest.raises(UserError, match="--target tensorrt"):
        quantize.export_quantized(tiny_loaded.directory, tmp_path / "out", "plugin", "int8")
