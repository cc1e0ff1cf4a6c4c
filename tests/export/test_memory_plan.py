"""moe-export --memory-plan: per-part parameter counts against the PyTorch model built on the meta device (no
weights), the command's text and JSON, and the issue's targets for the released models."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cli
from export.boards import BOARDS, GIB
from export.memory_plan import PlanRequest, WeightPrecision, load_config, plan_memory
from moe_llava.model import MoELlavaForCausalLM
from moe_llava.tower_specs import KNOWN_TOWERS

REPO = Path(__file__).resolve().parents[2]
RELEASED = REPO / "tests" / "assets" / "released_configs"
MODELS = sorted(p.name for p in RELEASED.iterdir() if p.is_dir())


def meta_counts(name: str) -> dict[str, int]:
    """Parameters per plan part of the model as the project builds it (on the meta device: shapes only)."""
    cfg = load_config(RELEASED / name)
    with torch.device("meta"):
        model = MoELlavaForCausalLM(cfg, KNOWN_TOWERS[cfg.mm_image_tower])
    counts = dict.fromkeys(("vision tower", "projector", "embedding table", "decoder dense", "MoE experts",
                            "lm_head"), 0)
    vision = model.vision_tower.model
    layers = vision.vision_model.encoder.layers if hasattr(vision, "vision_model") else vision.encoder.layers
    used = len(layers) + 1 + cfg.mm_vision_select_layer  # the layers the selected hidden state depends on
    pruned = {id(p) for layer in list(layers)[used:] for p in layer.parameters()}
    for name_, p in model.named_parameters():
        if name_.startswith("vision_tower."):
            keep = id(p) not in pruned and "post_layernorm" not in name_ and ".head." not in name_
            counts["vision tower"] += p.numel() if keep else 0
        elif name_.startswith("projector."):
            counts["projector"] += p.numel()
        elif "lm_head" in name_:
            counts["lm_head"] += p.numel()
        elif "embed_tokens" in name_ or ".wte." in name_:
            counts["embedding table"] += p.numel()
        elif any(k in name_ for k in ("fc1_weight", "fc2_weight", "fc1_bias", "fc2_bias", "mlp.router")):
            counts["MoE experts"] += p.numel()
        else:
            counts["decoder dense"] += p.numel()
    return counts


@pytest.mark.parametrize("name", MODELS)
def test_part_sizes_match_the_model(name):
    plan = plan_memory(load_config(RELEASED / name), PlanRequest(WeightPrecision.FP16, BOARDS["thor"], 2048))
    assert plan["params"] == meta_counts(name)


def plan(name, precision, board, seq=2048):
    return plan_memory(load_config(RELEASED / name), PlanRequest(WeightPrecision(precision), BOARDS[board], seq))


def test_issue_targets():
    """StableLM-1.6B-4e fp16 does not fit an 8 GB board; int4 plans of StableLM and Phi2 do, within 2.5 and 4
    GiB (2.37 and 3.84 GiB: 2.54 and 4.12 decimal GB, see docs/jetson.md)."""
    assert not plan("MoE-LLaVA-StableLM-1.6B-4e", "fp16", "orin-nano-8gb")["fits"]
    stablelm, phi2 = plan("MoE-LLaVA-StableLM-1.6B-4e", "int4", "orin-nano-8gb"), \
        plan("MoE-LLaVA-Phi2-2.7B-4e", "int4", "orin-nano-8gb")
    assert stablelm["fits"] and phi2["fits"] and stablelm["kv_copies"] == phi2["kv_copies"] == 1
    assert stablelm["total"] <= 2.5 * GIB and phi2["total"] <= 4 * GIB  # the issue's targets, read as GiB
    fp16 = plan("MoE-LLaVA-StableLM-1.6B-4e", "fp16", "thor")
    assert sum(fp16["weights"].values()) == pytest.approx(2 * sum(fp16["params"].values()), rel=1e-3)
    int4 = plan("MoE-LLaVA-StableLM-1.6B-4e", "int4", "thor")
    assert int4["weights"]["MoE experts"] == pytest.approx(fp16["weights"]["MoE experts"] * (0.5 + 2 / 128) / 2,
                                                           rel=1e-3)  # half a byte + an fp16 scale per 128


def test_command_text_json_and_refusal(tmp_path, capsys):
    model = str(RELEASED / "MoE-LLaVA-StableLM-1.6B-4e")
    base = ["--model", model, "--target", "tensorrt", "--max-seq", "2048", "--memory-plan"]
    assert cli.export_main(base + ["--precision", "fp16", "--gpu", "orin-nano-8gb"]) == 0
    text = capsys.readouterr().out
    assert "does NOT fit" in text and "would fit: --precision int8" in text and "MoE experts weights" in text
    assert cli.export_main(base + ["--precision", "int4", "--gpu", "orin-nano-8gb", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fits"] and report["group_size"] == 128 and report["usable"] == int(6.5 * GIB)
    assert report["total"] == sum(report["weights"].values()) + sum(
        report[k] for k in ("kv_cache", "moe_workspace", "activations", "runtime_buffers"))
    assert cli.export_main(base + ["--precision", "int4", "--gpu", "orin"]) == 2
    assert "--memory-plan needs --gpu BOARD" in capsys.readouterr().err


def test_plan_reads_config_json_only():
    """No torch, no safetensors, no TensorRT: a directory holding only config.json is enough."""
    code = ("import json, sys\nimport cli\n"
            f"rc = cli.export_main(['--model', {str(RELEASED / 'MoE-LLaVA-Phi2-2.7B-4e')!r}, '--target', 'tensorrt', "
            "'--precision', 'int4', '--gpu', 'orin-nx-8gb', '--memory-plan', '--json'])\n"
            "print(json.dumps([rc, sorted(m for m in ('torch', 'safetensors', 'tensorrt', 'onnx') "
            "if m in sys.modules)]))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [0, []]
