"""moe-export / moe-run --engine-dir on a tiny -384-style model (SigLIP tower): token-identical to PyTorch."""
import json

import pytest

import cli
from cli_helpers import ASSETS, last_json, run_cli
from tiny import write_tiny_checkpoint

ARGS = ["--image", str(ASSETS / "shapes_96x60.png"), "--prompt", "What is in the image?",
        "--max-new-tokens", "12", "--json"]


@pytest.mark.slow
def test_siglip_engine_dir_matches_pytorch(tmp_path, capsys):
    checkpoint, out = tmp_path / "ckpt", tmp_path / "export"
    write_tiny_checkpoint(checkpoint, "stablelm", tower="siglip")
    code, _, stderr = run_cli(cli.export_main, ["--model", str(checkpoint), "--target", "onnx", "--moe-impl", "ort",
                                                "--out", str(out)], capsys)
    assert code == 0, stderr
    report = json.loads((out / "validation.json").read_text())
    assert report["passed"] and report["parts"]["vision"]["max_abs_error"] <= 1e-4
    assert report["router_agreement"] == 1.0 and report["greedy_agreement"] == 1.0
    image = json.loads((out / "manifest.json").read_text())["image"]
    assert image["pad_color"] == [127, 127, 127] and image["size"] == [28, 28] and image["crop_size"] is None

    code, torch_out, err = run_cli(cli.run_main, ["--model", str(checkpoint)] + ARGS, capsys)
    assert code == 0, err
    code, ort_out, err = run_cli(cli.run_main, ["--engine-dir", str(out)] + ARGS, capsys)
    assert code == 0, err
    want, got = last_json(torch_out), last_json(ort_out)
    assert len(want["token_ids"]) > 0 and got["token_ids"] == want["token_ids"] and got["text"] == want["text"]
    assert got["prompt_tokens"] == want["prompt_tokens"]
