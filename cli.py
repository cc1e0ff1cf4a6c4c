"""Console entry points: argument parsing only; every command is one call into the packages.

Bad input raises `UserError` anywhere below; it is printed here as one line, exit code 2, no traceback.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from runtime.errors import UserError


def _guarded(main: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser, argv) -> int:
    args = parser.parse_args(argv)
    try:
        return main(args) or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


# ---- moe-run ----------------------------------------------------------------------------------
def _run_parser() -> argparse.ArgumentParser:
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
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="compute dtype of --model: auto = fp32 on CPU, the checkpoint's dtype on CUDA")
    p.add_argument("--json", action="store_true", help="print one JSON object (text, token_ids, timings) last")
    return p


def _run(args: argparse.Namespace) -> int:
    from runtime.cli_output import run_to_stdout
    if args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    if args.engine_dir:
        from runtime.pipeline import load_pipeline
        pipeline = load_pipeline(args.engine_dir, backend=args.backend)
    else:
        from moe_llava.inference import torch_pipeline
        pipeline = torch_pipeline(args.model, vision_tower=args.vision_tower, dtype=args.dtype)
    with pipeline:
        return run_to_stdout(pipeline, args.image, args.prompt, args.max_new_tokens, args.temperature,
                             args.top_p, args.seed, args.json)


def run_main(argv=None) -> int:
    return _guarded(_run, _run_parser(), argv)


# ---- moe-export --------------------------------------------------------------------------------
def _export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moe-export", description="Export MoE-LLaVA to ONNX graphs or TensorRT "
                                "engines, validated against PyTorch (validation.json).")
    p.add_argument("--model", help="checkpoint directory (official MoE-LLaVA layout) or 'demo'")
    p.add_argument("--target", choices=["onnx", "tensorrt"], default="onnx")
    p.add_argument("--moe-impl", choices=["auto", "ort", "plugin", "portable"], default="auto",
                   help="MoE lowering: ort = com.microsoft.MoE, plugin = the TensorRT plugin node, "
                        "portable = standard ONNX ops; auto = ort for onnx, plugin for tensorrt")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8", "int4", "fp8"], default="fp32",
                   help="int8/int4/fp8 quantise with calibration data (routers and norms stay in float)")
    p.add_argument("--vision-tower", help="local CLIP/SigLIP directory overriding the config's mm_image_tower")
    p.add_argument("--no-validate", action="store_true", help="skip the comparison against PyTorch")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    q = p.add_argument_group("quantisation")
    q.add_argument("--calib-data", help="LLaVA-JSON file or image folder for calibration (default: synthetic set)")
    q.add_argument("--calib-min-tokens", type=int, default=32,
                   help="add calibration samples until every expert of every MoE layer saw this many tokens")
    t = p.add_argument_group("tensorrt")
    t.add_argument("--from-onnx", help="build engines from an ONNX export directory (no torch needed)")
    t.add_argument("--plugin", help="path of libmoe_llava_plugin.so (default: look next to the package)")
    t.add_argument("--gpu", default="auto", help="target GPU family for checks, e.g. orin, thor, hopper, ada")
    t.add_argument("--max-batch", type=int, default=1)
    t.add_argument("--max-seq", type=int, default=2048, help="longest prompt + answer the engines accept")
    t.add_argument("--workspace-mb", type=int, default=None, help="builder memory-pool limit (8 GB Jetsons)")
    t.add_argument("--timing-cache", help="timing cache file to reuse across builds")
    return p


def _export(args: argparse.Namespace) -> int:
    if args.target == "tensorrt":
        from export.tensorrt_build import export_tensorrt
        out = export_tensorrt(model=args.model, from_onnx=args.from_onnx, out=args.out, moe_impl=args.moe_impl,
                              precision=args.precision, plugin=args.plugin, gpu=args.gpu,
                              max_batch=args.max_batch, max_seq=args.max_seq, workspace_mb=args.workspace_mb,
                              timing_cache=args.timing_cache, vision_tower=args.vision_tower,
                              calib_data=args.calib_data, calib_min_tokens=args.calib_min_tokens)
        print(f"wrote {out}")
        return 0
    if not args.model:
        raise UserError("--model is required (a checkpoint directory or 'demo')")
    if args.precision in ("int8", "int4", "fp8"):
        from calibration.quantize import export_quantized
        out = export_quantized(args.model, args.out, args.moe_impl, args.precision, args.vision_tower,
                               calib_data=args.calib_data, calib_min_tokens=args.calib_min_tokens,
                               validate=not args.no_validate)
    else:
        from export.onnx_export import export_onnx
        out = export_onnx(args.model, args.out, args.moe_impl, args.precision, args.vision_tower,
                          validate=not args.no_validate)
    _print_validation(out)
    return 0


def _print_validation(out) -> None:
    import json
    from pathlib import Path
    report_path = Path(out) / "validation.json"
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        worst = max(report["parts"].items(), key=lambda kv: kv[1]["max_abs_error"])
        print(f"validated: greedy agreement {report['greedy_agreement']:.3f}, router top-k agreement "
              f"{report['router_agreement']:.3f}, worst part {worst[0]} max abs error {worst[1]['max_abs_error']:.2e}")
    print(f"wrote {out}")


def export_main(argv=None) -> int:
    return _guarded(_export, _export_parser(), argv)


# ---- moe-bench (parser lives with the benchmark code) --------------------------------------------
def bench_main(argv=None) -> int:
    from moe_llava.bench.command import bench_command, bench_parser
    return _guarded(bench_command, bench_parser(), argv)


# ---- moe-train / moe-eval (parsers live with the training code) --------------------------------
def train_main(argv=None) -> int:
    from moe_llava.train.command import train_parser, train_command
    return _guarded(train_command, train_parser(), argv)


def eval_main(argv=None) -> int:
    from moe_llava.train.command import eval_parser, eval_command
    return _guarded(eval_command, eval_parser(), argv)


if __name__ == "__main__":
    sys.exit(run_main())
