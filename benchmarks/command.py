"""`moe-bench`: the runtime against PyTorch eager on the same model, image, prompt and thread count.

    moe-bench --model DIR|demo [--engine-dir DIR | --moe-impl {ort,portable}] [--device auto|cpu|cuda]
              [--backends pytorch,onnxruntime|tensorrt] [--runs N] [--warmup N] [--max-new-tokens N] [--threads N]
              [--image PATH] [--prompt TEXT] [--json PATH] [--plot PATH]
              [--scale-experts 4,8,16 [--scale-preset small] [--scale-dir DIR]]

Without --engine-dir the model is exported (--moe-impl ort by default, fp32 - fp16 on CUDA -, no validation) into a
temp dir first. Both sides run on one device (see cuda_device.py): on CUDA, PyTorch eager fp16 against the
runtime on ONNX Runtime's CUDA provider (or TensorRT engines, --backends pytorch,tensorrt --engine-dir DIR), every
lap CUDA-synchronised, the roofline against the GPU's measured DRAM bandwidth.
JSON: {"model", "settings", "pytorch": {vision_ms, projector_ms, ttft_ms, decode_tok_s, peak_rss_mb, preprocess_ms,
prefill_ms, decode_ms_per_token, load_s, spread, ...}, "runtime": {...}, "runtime_backend", "speedup": {ttft,
decode, vision, peak_rss_ratio}, "agreement", "machine", "roofline", "scaling" (with --scale-experts)}.
Python API: `bench_model(BenchOptions(...))` and `benchmarks.scaling.run_scaling(...)`.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import UserError

from .machine import busy_warning, load_average, machine_info
from .measure import BACKENDS, RUNTIME_BACKENDS, WorkerSpec, measure_interleaved
from .report import log as _log
from .report import progress as _progress
from .roofline import ITEMSIZE, achieved, decode_weight_bytes, measure_bandwidth, median_bandwidth
from .synthetic import Preset

DEFAULT_PROMPT = "What is in the image?"


@dataclass(frozen=True)
class BenchOptions:
    model: str | None
    engine_dir: str | None = None
    backends: tuple[str, ...] = BACKENDS
    runs: int = 5
    warmup: int = 1
    new_tokens: int = 32
    threads: int = os.cpu_count() or 1
    image: str | None = None
    prompt: str = DEFAULT_PROMPT
    moe_impl: str = "ort"  # lowering of the temp export (no --engine-dir)
    device: str = "cpu"    # resolved: "cpu" | "cuda", for every side


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moe-bench", description="Latency and memory of the runtime against PyTorch "
                                "eager on the same model and inputs: vision, projector, time to first token, decode "
                                "tokens/s (and % of the memory-bandwidth roofline), peak RSS. Each backend runs in "
                                "its own process; runs are interleaved; medians are reported.")
    p.add_argument("--model", help="checkpoint directory (official MoE-LLaVA layout) or 'demo'")
    p.add_argument("--engine-dir", help="export directory to time (default: export --model into a temp dir)")
    p.add_argument("--moe-impl", choices=["ort", "portable"], default="ort",
                   help="MoE lowering of that temp export (com.microsoft.MoE or standard ONNX ops)")
    p.add_argument("--backends", type=_backend_list, default=list(BACKENDS),
                   help="comma-separated: pytorch and one runtime, onnxruntime or tensorrt (default: "
                        "pytorch,onnxruntime; tensorrt needs --engine-dir with TensorRT engines)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where both sides run: auto (default) = CUDA when every backend can use a GPU here, "
                        "else CPU; cuda = PyTorch eager fp16 vs the runtime on CUDA (refused where absent)")
    p.add_argument("--runs", type=int, default=5, help="measured runs per backend (medians are reported)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured runs per backend first")
    p.add_argument("--max-new-tokens", type=int, default=32,
                   help="tokens generated per run; EOS is ignored so every run decodes N-1 steps")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="intra-op threads of both backends (torch.set_num_threads / onnxruntime)")
    p.add_argument("--image", help="image file (default: a fixed synthetic picture)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="question; the model's chat template is applied")
    p.add_argument("--json", help="write the figures to this JSON file")
    p.add_argument("--plot", help="write a PNG bar chart here (the scaling chart goes next to it, *-scaling.png)")
    p.add_argument("--precisions", type=_dir_list, metavar="DIR,DIR,...",
                   help="export directories of one model at several precisions (fp32, int8, int4 ...): size on "
                        "disk, agreement and POPE F1 from each validation.json, decode / prefill speed on CPU")
    s = p.add_argument_group("MoE scaling study (random StableLM-shaped models, equal active size)")
    s.add_argument("--scale-experts", type=_int_list, help="expert counts to compare at k=2, e.g. 4,8,16")
    s.add_argument("--scale-preset", choices=[x.value for x in Preset], default=Preset.SMALL.value,
                   help="model size of the study (see benchmarks/synthetic.py)")
    s.add_argument("--scale-dir", help="keep the study's checkpoints and exports here and reuse them (default: temp)")
    return p


def _backend_list(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    known = ("pytorch", *RUNTIME_BACKENDS)
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown backend(s) {bad}; choose from {','.join(known)}")
    if all(r in names for r in RUNTIME_BACKENDS):
        raise argparse.ArgumentTypeError("time one runtime per run: onnxruntime or tensorrt")
    return list(dict.fromkeys(names))


def _dir_list(text: str) -> list[str]:
    dirs = [t.strip() for t in text.split(",") if t.strip()]
    missing = [d for d in dirs if not (Path(d) / "manifest.json").is_file()]
    if missing or not dirs:
        raise argparse.ArgumentTypeError(f"not export directories (no manifest.json): {missing or text!r}")
    return dirs


def _int_list(text: str) -> list[int]:
    try:
        values = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if len(values) < 2 or values[0] < 2:
        raise argparse.ArgumentTypeError("give at least two expert counts, each >= 2 (k=2)")
    return values


def main(args: argparse.Namespace) -> int:
    _check(args)
    report = {}
    if args.model or args.engine_dir:
        from .report import bench_table
        device = _device(args)
        report = bench_model(BenchOptions(args.model, args.engine_dir, tuple(args.backends), args.runs, args.warmup,
                                          args.max_new_tokens, args.threads, args.image, args.prompt,
                                          args.moe_impl, device))
        print(bench_table(report))
    if args.scale_experts:
        _scaling(args, report)
    if args.precisions:
        from calibration.report import format_table, precision_table
        report["precisions"] = precision_table(args.precisions, threads=args.threads)
        print(format_table(report["precisions"]))
    _write_outputs(report, args.json, args.plot)
    return 0


def _scaling(args: argparse.Namespace, report: dict) -> None:
    from .report import scaling_table
    from .scaling import run_scaling
    load_before = load_average()
    report["scaling"] = run_scaling(args.scale_experts, args.scale_preset, list(args.backends), args.threads,
                                    args.runs, args.warmup, args.max_new_tokens, work_dir=args.scale_dir)
    report.setdefault("machine", machine_info(args.threads, load_before))
    print(scaling_table(report["scaling"]))
    if "model" not in report and busy_warning(report["machine"]):
        print(busy_warning(report["machine"]))


def _device(args: argparse.Namespace) -> str:
    """The one device of every side, announced on stderr."""
    from runtime.device import Device

    from .cuda_device import choose_bench_device
    device = choose_bench_device(Device(args.device), list(args.backends)).value
    _log(f"device: {device} for {', '.join(args.backends)} (--device {args.device})")
    return device


def _check(args: argparse.Namespace) -> None:
    if not (args.model or args.engine_dir or args.scale_experts or args.precisions):
        raise UserError("give --model (a checkpoint directory or 'demo'), --engine-dir, --scale-experts or "
                        "--precisions")
    if "pytorch" in args.backends and args.engine_dir and not args.model:
        raise UserError("the pytorch backend needs --model; pass it or use --backends onnxruntime")
    if "tensorrt" in args.backends and not args.engine_dir:
        raise UserError("the tensorrt backend needs --engine-dir with TensorRT engines (moe-export --target tensorrt)")
    if args.device == "cuda" and (args.scale_experts or args.precisions):
        raise UserError("--scale-experts and --precisions run on the CPU only; drop --device cuda")
    for name, value, least in (("--runs", args.runs, 1), ("--warmup", args.warmup, 0),
                               ("--max-new-tokens", args.max_new_tokens, 2), ("--threads", args.threads, 1)):
        if value < least:
            raise UserError(f"{name} must be at least {least}, got {value}")
    if args.image and not Path(args.image).is_file():
        raise UserError(f"image {args.image} does not exist")


def bench_model(o: BenchOptions) -> dict:
    """Measure every backend of `o` on one model; returns the report (the JSON)."""
    config, source = _model_config(o)
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="moe-bench-") as tmp:
        engine_dir = o.engine_dir
        if "onnxruntime" in o.backends and engine_dir is None:
            engine_dir = _export(o.model, Path(tmp) / "engine", o.moe_impl, "fp16" if o.device == "cuda" else "fp32")
        manifest = _manifest(engine_dir) if engine_dir else None
        precision, moe_impl = (manifest.precision, manifest.moe_impl) if manifest else ("fp32", None)
        results, bandwidth = _measure(o, engine_dir)
    report = {"model": _model_info(config, source, o.engine_dir, precision, moe_impl),
              "settings": {"runs": o.runs, "warmup": o.warmup, "max_new_tokens": o.new_tokens,
                           "decode_steps": o.new_tokens - 1, "threads": o.threads, "prompt": o.prompt,
                           "image": o.image or "synthetic 448x336", "device": o.device,
                           "pytorch_dtype": "fp16" if o.device == "cuda" else "fp32"},
              **results, "machine": machine_info(o.threads, load_before)}
    runtime = [b for b in o.backends if b in RUNTIME_BACKENDS]
    if runtime:
        report["runtime_backend"] = runtime[0]
    if len(results) == 2:
        report["speedup"] = _speedup(results["pytorch"], results["runtime"])
        report["agreement"] = {"greedy_tokens": _agreement(results["pytorch"]["token_ids"],
                                                           results["runtime"]["token_ids"])}
    if bandwidth is not None:  # None: CUDA without a CUDA build of torch to probe the GPU with
        report["roofline"] = _roofline(config, precision, bandwidth, results, 2 if o.device == "cuda" else 4)
    fp32 = decode_weight_bytes(config, 4)
    report["model"].update(params_total=fp32.params_total, params_active=fp32.params_active)
    return report


def _measure(o: BenchOptions, engine_dir) -> tuple[dict[str, dict], dict | None]:
    """Interleaved rounds of every backend. On the CPU a copy-bandwidth probe runs between rounds (it drifts with
    the load as the timings do, so % of roofline compares like with like); on CUDA the GPU is probed once."""
    cpu = o.device == "cpu"
    probes = [measure_bandwidth(o.threads)] if cpu else []

    def between_rounds(done: int, total: int) -> None:
        if cpu:
            probes.append(measure_bandwidth(o.threads, repeats=3))
        _progress(done, total)
    specs = {_side(b): WorkerSpec(b, o.model if b == "pytorch" else str(engine_dir), o.prompt, o.new_tokens,
                                  o.threads, o.image, o.device) for b in o.backends}
    _log(f"measuring {', '.join(o.backends)} on {o.device}: {o.warmup} + {o.runs} interleaved rounds")
    results = measure_interleaved(specs, o.warmup, o.runs, between_rounds)
    if cpu:
        return results, median_bandwidth(probes)
    from .cuda_device import cuda_bandwidth
    return results, cuda_bandwidth()


def _model_config(o: BenchOptions):
    from moe_llava.config import MoELlavaConfig
    if o.model:
        from moe_llava.loading import resolve_model_dir
        directory = resolve_model_dir(o.model)
        return MoELlavaConfig.from_json(directory / "config.json"), str(directory)
    from runtime.manifest import Manifest
    return MoELlavaConfig.from_dict(Manifest.load(o.engine_dir).config), str(o.engine_dir)


def _export(model: str, out: Path, moe_impl: str, precision: str) -> Path:
    from export.onnx_export import export_onnx
    _log(f"exporting {model} to a temp dir (--moe-impl {moe_impl}, {precision}; pass --engine-dir to reuse an "
         "export)")
    return export_onnx(model, out, moe_impl, precision, validate=False)


def _manifest(engine_dir):
    from runtime.manifest import Manifest
    return Manifest.load(engine_dir)


def _side(backend: str) -> str:
    return "pytorch" if backend == "pytorch" else "runtime"


def _model_info(config, source: str, engine_dir, precision: str, moe_impl: str | None) -> dict:
    return {"source": source, "engine_dir": str(engine_dir) if engine_dir else "exported to a temp dir",
            "moe_impl": moe_impl,
            "model_type": config.model_type, "layers": config.num_layers, "hidden": config.hidden_size,
            "experts": max(config.moe.num_experts) if config.moe_layers else 0,
            "top_k": config.moe.top_k if config.moe_layers else 0, "precision": precision}


def _speedup(pytorch: dict, runtime: dict) -> dict:
    return {"ttft": pytorch["ttft_ms"] / runtime["ttft_ms"],
            "decode": runtime["decode_tok_s"] / pytorch["decode_tok_s"],
            "vision": pytorch["vision_ms"] / runtime["vision_ms"],
            "peak_rss_ratio": runtime["peak_rss_mb"] / pytorch["peak_rss_mb"]}


def _agreement(a: list[int], b: list[int]) -> float:
    """Fraction of positions, up to the longer list, where the greedy tokens agree before the first divergence."""
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return same / max(len(a), len(b), 1)


def _roofline(config, precision: str, bandwidth: dict, results: dict[str, dict], torch_itemsize: int) -> dict:
    """`torch_itemsize`: bytes per weight of the PyTorch side (4 on the CPU, 2 for fp16 on CUDA)."""
    fp32 = decode_weight_bytes(config, 4)
    sizes = {"pytorch": decode_weight_bytes(config, torch_itemsize).total}
    if "runtime" in results and precision in ITEMSIZE:  # int8/int4 exports: no simple byte count
        sizes["runtime"] = decode_weight_bytes(config, ITEMSIZE[precision]).total
    figures = {side: achieved(sizes[side], bandwidth["gbs"], results[side]["decode_tok_s"])
               for side in results if side in sizes}
    return {"bandwidth_gbs": bandwidth["gbs"], "bandwidth": bandwidth,
            "weight_bytes_per_token": {s: f["bytes_per_token"] for s, f in figures.items()},
            "ceiling_tok_s": {s: f["ceiling_tok_s"] for s, f in figures.items()},
            "achieved_gbs": {s: f["achieved_gbs"] for s, f in figures.items()},
            "pct_of_roofline": {s: f["pct_of_roofline"] for s, f in figures.items()},
            "pct_of_gemv_read": {s: 100 * f["achieved_gbs"] / bandwidth["gemv_read_gbs"] for s, f in figures.items()},
            "breakdown": fp32.to_dict(), "params_total": fp32.params_total, "params_active": fp32.params_active,
            "note": "weights only (active experts), fp32 breakdown; KV-cache traffic and activations excluded"}


def _write_outputs(report: dict, json_path: str | None, plot_path: str | None) -> None:
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
        _log(f"wrote {json_path}")
    if plot_path:
        from .report import plot_bench, plot_scaling
        plot = Path(plot_path)
        if "model" in report:
            _log(f"wrote {plot_bench(report, plot)}")
        if "scaling" in report:
            target = plot.with_name(plot.stem + "-scaling" + (plot.suffix or ".png")) if "model" in report else plot
            _log(f"wrote {plot_scaling(report['scaling'], target)}")
