"""`moe-export`: ONNX graphs or TensorRT engines, validated against PyTorch (validation.json)."""
from __future__ import annotations

import argparse

from runtime.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moe-export", description="Export MoE-LLaVA to ONNX graphs or TensorRT "
                                "engines, validated against PyTorch (validation.json).")
    p.add_argument("--model", help="checkpoint directory (official MoE-LLaVA layout) or 'demo'")
    p.add_argument("--target", choices=["onnx", "tensorrt"], default="onnx")
    p.add_argument("--moe-impl", choices=["auto", "ort", "plugin", "portable"], default="auto",
                   help="MoE lowering: ort = com.microsoft.MoE, plugin = the TensorRT plugin node, "
                        "portable = standard ONNX ops; auto = ort for onnx, plugin for tensorrt")
    p.add_argument("--attention", choices=["auto", "fused", "unfused"], default="auto",
                   help="decoder attention: fused = com.microsoft.GroupQueryAttention with the rotary inside and a "
                        "KV cache written in place (onnxruntime only); unfused = standard ONNX ops; "
                        "auto = fused with --moe-impl ort, unfused otherwise (TensorRT fuses standard ops itself)")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8", "int4", "fp8"], default="fp32",
                   help="int8/int4: weight-only quantisation on onnxruntime's fast CPU kernels (no calibration "
                        "data; routers and norms stay float); fp8 and --target tensorrt int8 calibrate Q/DQ")
    p.add_argument("--vision-tower", help="local CLIP/SigLIP directory overriding the config's mm_image_tower")
    p.add_argument("--no-validate", action="store_true", help="skip the comparison against PyTorch")
    p.add_argument("--out", help="output directory (written atomically; required unless --memory-plan)")
    q = p.add_argument_group("quantisation")
    q.add_argument("--calib-data", help="--target tensorrt: LLaVA-JSON file or image folder for calibration "
                   "(default: synthetic set)")
    q.add_argument("--calib-min-tokens", type=int, default=32,
                   help="add calibration samples until every expert of every MoE layer saw this many tokens")
    q.add_argument("--pope-per-split", type=int, default=None, metavar="N",
                   help="quantised exports: held-out POPE probes per split for the F1-drop check (default 100; "
                        "0 skips it - at a released model's size on a CPU each probe takes seconds)")
    t = p.add_argument_group("tensorrt")
    t.add_argument("--from-onnx", help="build engines from an ONNX export directory (no torch needed)")
    t.add_argument("--plugin", help="path of libmoe_llava_plugin.so (default: look next to the package)")
    t.add_argument("--gpu", default="auto",
                   help="target GPU family (orin, thor, hopper, ada, ...), or a board (orin-nano-8gb, orin-nx-16gb, "
                        "agx-orin-64gb, thor, rtx-4090, h100, ...) or memory size (24GB): a build that cannot fit "
                        "the board stops before it starts")
    t.add_argument("--max-batch", type=int, default=1)
    t.add_argument("--max-seq", type=int, default=2048, help="longest prompt + answer the engines accept")
    t.add_argument("--workspace-mb", type=int, default=None, help="builder memory-pool limit (8 GB Jetsons)")
    t.add_argument("--timing-cache", help="timing cache file to reuse across builds")
    m = p.add_argument_group("memory plan")
    m.add_argument("--memory-plan", action="store_true",
                   help="print the device memory per part for --model DIR's config.json, --precision, --gpu BOARD "
                        "and --max-seq, against the board's usable memory; builds nothing")
    m.add_argument("--json", action="store_true", help="the memory plan as JSON")
    m.add_argument("--group-size", type=int, choices=[64, 128], default=128, help="int4 quantisation group")
    return p


def main(args: argparse.Namespace) -> int:
    if args.memory_plan:
        from export.memory_command import print_memory_plan
        return print_memory_plan(args.model, args.precision, args.gpu, args.max_seq, args.max_batch,
                                 args.group_size, args.json)
    if args.out is None:
        raise UserError("--out is required")
    if args.target == "tensorrt":
        if args.attention == "fused":
            raise UserError("--attention fused is an onnxruntime op; TensorRT engines keep standard-op attention "
                            "(its builder fuses it): drop --attention or use --target onnx")
        from calibration.tensorrt_quantised import export_tensorrt_quantised
        out = export_tensorrt_quantised(model=args.model, from_onnx=args.from_onnx, out=args.out,
                                        moe_impl=args.moe_impl, precision=args.precision, plugin=args.plugin,
                                        gpu=args.gpu, max_batch=args.max_batch, max_seq=args.max_seq,
                                        workspace_mb=args.workspace_mb, timing_cache=args.timing_cache,
                                        vision_tower=args.vision_tower, calib_data=args.calib_data,
                                        calib_min_tokens=args.calib_min_tokens, group_size=args.group_size)
        print(f"wrote {out}")
        return 0
    if not args.model:
        raise UserError("--model is required (a checkpoint directory or 'demo')")
    if args.precision in ("int8", "int4", "fp8"):
        from calibration.quantize import export_quantized
        if args.calib_data:
            raise UserError("--calib-data is read by --target tensorrt only: onnx int8/int4 exports are weight-only "
                            "and need no calibration data (drop --calib-data)")
        out = export_quantized(args.model, args.out, args.moe_impl, args.precision, args.vision_tower,
                               validate=not args.no_validate, attention=args.attention,
                               pope_per_split=args.pope_per_split)
    else:
        from export.onnx_export import export_onnx
        out = export_onnx(args.model, args.out, args.moe_impl, args.precision, args.vision_tower,
                          validate=not args.no_validate, attention=args.attention)
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
