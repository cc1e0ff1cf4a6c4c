"""`moe-run`: answer a question about an image, streaming the answer, from an export or a checkpoint."""
from __future__ import annotations

import argparse

from runtime.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moe-run", description="Answer a question about an image with MoE-LLaVA, "
                                "streaming the answer. Greedy unless --temperature > 0.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="PyTorch checkpoint directory (official MoE-LLaVA layout) or 'demo'")
    src.add_argument("--engine-dir", help="export directory written by moe-export (no torch needed)")
    p.add_argument("--image", help="image file; omit for a text-only prompt")
    p.add_argument("--prompt", required=True, help="the question; the model's chat template is applied")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--vision-tower", help="local CLIP/SigLIP directory overriding the config's mm_image_tower")
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "tensorrt"],
                   help="engine library for --engine-dir")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto (default): CUDA when the engine library can use a GPU here (onnxruntime-gpu, a CUDA "
                        "build of torch; TensorRT always), else the CPU; stderr says which runs")
    p.add_argument("--json", action="store_true", help="print one JSON object (text, token_ids, timings) last")
    return p


def main(args: argparse.Namespace) -> int:
    from runtime.cli_output import run_to_stdout
    if args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    from runtime.device import Device
    if args.engine_dir:
        from runtime.device import open_runtime
        pipeline, _ = open_runtime(args.engine_dir, args.backend, Device(args.device), "moe-run")
    else:
        from moe_llava.inference import torch_pipeline
        from moe_llava.torch_device import choose_torch
        choice = choose_torch(Device(args.device))
        pipeline = torch_pipeline(args.model, vision_tower=args.vision_tower, device=choice.device.value)
        choice.announce("moe-run")
    with pipeline:
        return run_to_stdout(pipeline, args.image, args.prompt, args.max_new_tokens, args.temperature,
                             args.top_p, args.seed, args.json)
