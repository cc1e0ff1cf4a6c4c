"""torch_pipeline(dtype=...) casts every input to where and what the model is: the path `--device cuda` takes
(fp16 on the GPU), checked here with fp16 on the CPU against fp32 on the embedded demo model."""
from __future__ import annotations

from pathlib import Path

import torch

from moe_llava.inference import torch_pipeline

IMAGE = str(Path(__file__).resolve().parents[2] / "moe_llava" / "assets" / "demo" / "example.png")
PROMPT = "Is there a circle in the image?"


def test_fp16_pipeline_answers_like_fp32():
    with torch_pipeline("demo") as fp32, torch_pipeline("demo", dtype=torch.float16) as fp16:
        assert fp16.engine.dtype == torch.float16 and fp16.engine.device.type == "cpu"
        routers = {p.dtype for n, p in fp16.engine.model.named_parameters() if "router" in n}
        assert routers == {torch.float32}  # routers stay fp32, as trained
        a = fp32.generate(IMAGE, PROMPT, max_new_tokens=4)
        b = fp16.generate(IMAGE, PROMPT, max_new_tokens=4)
    assert b.token_ids == a.token_ids  # the demo's answer (" Yes") has a wide logit margin: fp16 keeps it
