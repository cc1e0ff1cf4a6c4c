"""moe-export --target onnx, then moe-run --engine-dir, on a tiny Qwen-1 checkpoint (qwen.tiktoken, no
tokenizer.json): token-identical to moe-run --model, for both CPU lowerings; the seq_length cap travels."""
import json

import pytest

import cli
from cli_helpers import ASSETS, last_json, run_cli
from tiny import write_tiny_checkpoint

IMAGE = str(ASSETS / "shapes_96x60.png")
ARGS = ["--image", IMAGE, "--prompt", "What is in the image?", "--max-new-tokens", "12", "--json"]


@pytest.fixture(scope="module")
def qwen_checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("qwen_ckpt")
    write_tiny_checkpoint(directory, "qwen")
    assert (directory / "qwen.tiktoken").is_file() and not (directory / "tokenizer.json").exists()
    return directory


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["ort", "portable"])
def test_qwen_engine_dir_matches_pytorch(impl, qwen_checkpoint, tmp_path, capsys):
    out = tmp_path / "export"
    code, _, stderr = run_cli(cli.export_main, ["--model", str(qwen_checkpoint), "--target", "onnx",
                                                "--moe-impl", impl, "--out", str(out)], capsys)
    assert code == 0, stderr
    report = json.loads((out / "validation.json").read_text())
    assert report["passed"] and report["moe_impl"] == impl
    for part in ("decoder_prefill_logits", "decoder_decode_logits"):
        assert report["parts"][part]["max_abs_error"] <= 1e-4
    assert report["router_agreement"] == 1.0 and report["greedy_agreement"] == 1.0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model_type"] == "moe_llava_qwen" and manifest["template"] == "qwen"
    assert manifest["decoder"]["max_positions"] == 256                      # = seq_length
    assert (out / "tokenizer.json").is_file()                               # converted once, at export

    code, torch_out, err = run_cli(cli.run_main, ["--model", str(qwen_checkpoint)] + ARGS, capsys)
    assert code == 0, err
    code, ort_out, err = run_cli(cli.run_main, ["--engine-dir", str(out)] + ARGS, capsys)
    assert code == 0, err
    want, got = last_json(torch_out), last_json(ort_out)
    assert len(want["token_ids"]) > 0
    assert got["token_ids"] == want["token_ids"] and got["text"] == want["text"]

    # seq_length is 256: a longer prompt is a one-line error on both paths, never numbers Qwen-1 would not give
    long = ["--prompt", "What is in the image? " * 60]
    code, _, err = run_cli(cli.run_main, ["--model", str(qwen_checkpoint)] + long, capsys)
    assert code == 2 and "context holds 256" in err
    code, _, err = run_cli(cli.run_main, ["--engine-dir", str(out)] + long, capsys)
    assert code == 2 and "256" in err
