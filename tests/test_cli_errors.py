"""Bad input: one line on stderr naming the problem, exit code 2, no traceback, nothing half-written."""
import pytest

import cli
from cli_helpers import ASSETS, run_cli
from tiny import write_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    write_tiny_checkpoint(path)
    return path


def assert_one_line_error(code, err, *words):
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], lines[0]


def test_missing_model_dir(tmp_path, capsys):
    code, _, err = run_cli(cli.run_main, ["--model", str(tmp_path / "nope"), "--prompt", "hi"], capsys)
    assert_one_line_error(code, err, "does not exist")


def test_missing_and_unreadable_images(checkpoint, tmp_path, capsys):
    base = ["--model", str(checkpoint), "--prompt", "hi"]
    code, _, err = run_cli(cli.run_main, base + ["--image", str(tmp_path / "no.png")], capsys)
    assert_one_line_error(code, err, "no.png")
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    code, _, err = run_cli(cli.run_main, base + ["--image", str(broken)], capsys)
    assert_one_line_error(code, err, "broken.png")


def test_directory_without_config(tmp_path, capsys):
    code, _, err = run_cli(cli.run_main, ["--model", str(tmp_path), "--prompt", "hi"], capsys)
    assert_one_line_error(code, err, "config.json")


def test_export_refuses_a_foreign_directory(checkpoint, tmp_path, capsys):
    (tmp_path / "precious.txt").write_text("keep me")
    code, _, err = run_cli(cli.export_main, ["--model", str(checkpoint), "--out", str(tmp_path)], capsys)
    assert_one_line_error(code, err, "not an export directory")
    assert (tmp_path / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize("flags, words", [
    (["--moe-impl", "portable", "--attention", "fused"], ("--attention fused needs --moe-impl ort",)),
    (["--target", "tensorrt", "--attention", "fused"], ("--attention fused", "TensorRT")),
    (["--moe-impl", "portable", "--kv-cache", "int8"], ("--kv-cache int8", "needs fused attention")),
    (["--attention", "unfused", "--kv-cache", "int8"], ("--kv-cache int8", "needs fused attention")),
    (["--target", "tensorrt", "--kv-cache", "int8"], ("--kv-cache int8", "TensorRT")),
])
def test_fused_attention_outside_onnxruntime_is_refused(checkpoint, tmp_path, capsys, flags, words):
    out = tmp_path / "out"
    code, _, err = run_cli(cli.export_main, ["--model", str(checkpoint), "--out", str(out)] + flags, capsys)
    assert_one_line_error(code, err, *words)
    assert not out.exists()


def test_failed_validation_leaves_nothing_behind(checkpoint, tmp_path, capsys, monkeypatch):
    import export.validate as validate
    real = validate.compare

    def failing(*args, **kwargs):
        report = real(*args, **kwargs)
        report["failures"] = ["greedy agreement 0.000 < 0.9 (forced by the test)"]
        return report
    monkeypatch.setattr(validate, "compare", failing)
    out = tmp_path / "out"
    code, _, err = run_cli(cli.export_main, ["--model", str(checkpoint), "--out", str(out)], capsys)
    assert_one_line_error(code, err, "failed validation", "greedy agreement")
    assert list(tmp_path.iterdir()) == []  # neither the output nor a staging dir


def test_json_is_the_last_stdout_line(checkpoint, capsys):
    import json
    code, out, err = run_cli(cli.run_main, ["--model", str(checkpoint), "--image", str(ASSETS / "shapes_96x60.png"),
                                            "--prompt", "What is it?", "--max-new-tokens", "5", "--json"], capsys)
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert {"text", "token_ids", "timings"} <= set(result) and len(result["token_ids"]) <= 5
