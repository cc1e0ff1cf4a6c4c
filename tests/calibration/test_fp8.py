"""fp8 has no onnxruntime CPU kernels: refused with one line pointing to --target tensorrt."""
import pytest

import cli
from calibration.quantize import check_precision, export_quantized
from cli_helpers import run_cli
from runtime.errors import UserError


def test_fp8_is_refused_with_a_pointer_to_tensorrt(tmp_path):
    with pytest.raises(UserError) as info:
        export_quantized("demo", tmp_path / "out", precision="fp8")
    message = str(info.value)
    assert "--target tensorrt" in message and "Orin" in message and "\n" not in message
    assert not (tmp_path / "out").exists()


def test_fp8_cli_exit_code(tmp_path, capsys):
    code, _, err = run_cli(cli.export_main, ["--model", "demo", "--precision", "fp8", "--out", str(tmp_path / "o")],
                           capsys)
    assert code == 2 and "--target tensorrt" in err and "Hopper" in err


def test_unknown_precision():
    with pytest.raises(UserError, match="not a quantised precision"):
        check_precision("int3")
    assert check_precision("int4").value == "int4"
