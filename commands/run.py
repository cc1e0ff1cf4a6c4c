"""`moe-run`: answer a question about an image, streaming the answer, from an export or a checkpoint."""
from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moe-run", description="Answer a question about an image with MoE-LLaVA, "
                                "streaming the answer. Greedy unless --temperature > 0.")
    add_engine_flags(p)
    p.add_argument("--image", help="image file; omit for a text-only prompt")
    p.add_argument("--prompt", required=True, help="the question; the model's chat template is applied")
    add_generation_flags(p)
    p.add_argument("--vision-tower", help="local CLIP/SigLIP directory overriding the config's mm_image_tower")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="compute dtype of --model: auto = fp32 on CPU, the checkpoint's dtype on CUDA")
    p.add_argument("--json", action="store_true", help="print one JSON object (text, token_ids, timings) last")
    return p


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    """What answers (moe-run, moe-serve): --model or --engine-dir, the engine library and the device."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="PyTorch checkpoint directory (official MoE-LLaVA layout) or 'demo' "
                     "(needs torch)")
    src.add_argument("--engine-dir", help="export directory written by moe-export (no torch needed)")
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "tensorrt"],
                   help="engine library for --engine-dir")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto (default): CUDA when the engine library can use a GPU here (onnxruntime-gpu, a CUDA "
                        "build of torch; TensorRT always), else the CPU; stderr says which runs")


def add_generation_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=64, help="answer length limit (finish reason 'length')")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep this much probability mass")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="> 1 discourages tokens already in the context (transformers' definition; 1 = off)")
    g.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="[-2, 2]: subtract this times a token's count in the answer (OpenAI's definition)")
    g.add_argument("--presence-penalty", type=float, default=0.0,
                   help="[-2, 2]: subtract this from every token already in the answer (OpenAI's definition)")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end the answer before this text (repeatable, up to 4)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")


def generation_settings(args: argparse.Namespace):
    from runtime.settings import GenerationSettings
    return GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, repetition_penalty=args.repetition_penalty,
                              frequency_penalty=args.frequency_penalty, presence_penalty=args.presence_penalty,
                              stop=tuple(args.stop), seed=args.seed)


def main(args: argparse.Namespace) -> int:
    from runtime.cli_output import run_to_stdout
    settings = generation_settings(args)  # checked before any model is loaded
    from runtime.device import Device
    if args.engine_dir:
        from runtime.device import open_runtime
        pipeline, _ = open_runtime(args.engine_dir, args.backend, Device(args.device), "moe-run")
    else:
        from moe_llava.inference import torch_pipeline
        from moe_llava.torch_device import choose_torch
        choice = choose_torch(Device(args.device))
        pipeline = torch_pipeline(args.model, vision_tower=args.vision_tower, device=choice.device.value,
                                  dtype=args.dtype)
        choice.announce("moe-run")
    with pipeline:
        return run_to_stdout(pipeline, args.image, args.prompt, settings, args.json)
