"""moe-export --target onnx, then moe-run --engine-dir: token-identical to moe-run --model (PyTorch)."""
import json

import onnx
import pytest

import cli
from cli_helpers import ASSETS, last_json, run_cli
from export.plugin_swap import ort_equivalent_dir

CASES = [("stablelm", "ort"), ("stablelm", "portable"), ("stablelm", "plugin"), ("phi", "ort"), ("phi", "portable")]
IMAGE = str(ASSETS / "shapes_96x60.png")  # non-square: exercises pad-to-square
PROMPT = "What is in the image?"


@pytest.mark.slow
@pytest.mark.parametrize("family,impl", CASES)
def test_engine_dir_matches_pytorch(family, impl, checkpoints, tmp_path, capsys):
    out = tmp_path / "export"
    code, stdout, stderr = run_cli(cli.export_main, ["--model", str(checkpoints[family]), "--target", "onnx",
                                                     "--moe-impl", impl, "--out", str(out)], capsys)
    assert code == 0, stderr
    report = json.loads((out / "validation.json").read_text())
    assert report["passed"] and report["moe_impl"] == impl
    for part in ("decoder_prefill_logits", "decoder_decode_logits"):
        assert report["parts"][part]["max_abs_error"] <= 1e-4   # fp32: ORT vs PyTorch
    assert report["router_agreement"] == 1.0 and report["greedy_agreement"] == 1.0

    args = ["--image", IMAGE, "--prompt", PROMPT, "--max-new-tokens", "12", "--json"]
    code, torch_out, err = run_cli(cli.run_main, ["--model", str(checkpoints[family])] + args, capsys)
    assert code == 0, err
    engine_dir = out
    if impl == "plugin":  # no TensorRT here: run the plugin graph with its nodes swapped for com.microsoft.MoE
        engine_dir = ort_equivalent_dir(out, tmp_path / "swapped")
    code, ort_out, err = run_cli(cli.run_main, ["--engine-dir", str(engine_dir)] + args, capsys)
    assert code == 0, err
    want, got = last_json(torch_out), last_json(ort_out)
    assert len(want["token_ids"]) >= 2  # the prefill and at least one runtime decode step are compared
    assert got["token_ids"] == want["token_ids"] and got["text"] == want["text"]


@pytest.mark.slow
def test_plugin_graph_carries_the_tensorrt_contract(checkpoints, tmp_path, capsys):
    out = tmp_path / "plugin"
    assert run_cli(cli.export_main, ["--model", str(checkpoints["phi"]), "--moe-impl", "plugin",
                                     "--no-validate", "--out", str(out)], capsys)[0] == 0
    graph = onnx.load(str(out / "decoder.onnx"))
    nodes = [n for n in graph.graph.node if n.op_type == "MoELlavaMoE"]
    assert len(nodes) == 2 and all(n.domain == "moe_llava" for n in nodes)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attrs["num_experts"] == 4 and attrs["top_k"] == 2 and attrs["activation"] == 1  # gelu_tanh
    assert attrs["plugin_version"] == b"1" and attrs["plugin_namespace"] == b"moe_llava"
    assert {a.name: a.type for a in nodes[0].attribute}["top_k"] == onnx.AttributeProto.INT
    assert len(nodes[0].input) == 6
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["moe_impl"] == "plugin" and not (out / "validation.json").exists()
