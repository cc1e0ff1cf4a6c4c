"""Times the MoE plugin's CUDA kernels against an eager PyTorch MoE on the same GPU and inputs.

    python benchmarks/plugin_kernels.py [--model stablelm|phi2] [--tokens 1 8 64 577 2048] [--dtype fp16|fp32]
                                        [--weights fp16|int4 [--group 128]]

One MoE layer of the chosen MoE-LLaVA backbone (4 experts, top-2). Per token count T it prints both latencies, the
expert-weight bytes the layer must read (only the experts some token picked), the plugin's achieved GB/s and
TFLOP/s, and its share of the device's memory bandwidth when the device is known (or --peak-gbps is given).
Decode (small T) is bandwidth-bound: GB/s against the peak is the figure of merit there. --weights int4 runs the
INT4 weight-only experts (calibration/blockwise.py's group-wise quantiser; bytes counted as codes + scales) against
the same eager fp16 PyTorch MoE; max|diff| then includes the quantisation error.
Needs a CUDA GPU, torch with CUDA and nvcc (the kernels are built with torch.utils.cpp_extension).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PLUGIN_DIR = REPO / "runtime" / "plugins"
BINDING = REPO / "tests" / "plugins" / "moe_kernels_binding.cpp"


@dataclass(frozen=True)
class LayerShape:
    H: int
    I: int
    E: int
    K: int
    activation: int  # 0 swiglu, 1 gelu_tanh (the node's numbering)

    @property
    def F(self) -> int:
        return 2 * self.I if self.activation == 0 else self.I


MODELS = {
    "stablelm": LayerShape(H=2048, I=5632, E=4, K=2, activation=0),  # MoE-LLaVA-StableLM-1.6B-4e
    "phi2": LayerShape(H=2560, I=10240, E=4, K=2, activation=1),  # MoE-LLaVA-Phi2-2.7B-4e
}
# Peak DRAM bandwidth (GB/s) by device-name fragment, most specific first.
PEAK_GBPS = [("H200", 4800.0), ("H100 PCIe", 2000.0), ("H100", 3350.0), ("A100-SXM4-80GB", 2039.0),
             ("A100", 1555.0), ("Orin", 204.8), ("L4", 300.0), ("4090", 1008.0)]


def fail(message: str) -> None:
    sys.exit(f"plugin_kernels benchmark: {message}")


def load_kernels():
    from torch.utils.cpp_extension import load

    return load(name="moe_llava_kernels_bench", sources=[str(BINDING), str(PLUGIN_DIR / "moe_kernels.cu")],
                extra_include_paths=[str(PLUGIN_DIR)], extra_cflags=["-O2"], extra_cuda_cflags=["-O3"])


def make_layer(torch, shape: LayerShape, T: int, dtype):
    g = torch.Generator(device="cuda").manual_seed(T)

    def randn(*dims, scale=1.0):
        return (scale * torch.randn(*dims, generator=g, device="cuda")).to(dtype)

    E, F, H, I = shape.E, shape.F, shape.H, shape.I
    return dict(hidden=randn(T, H), router_logits=torch.randn(T, E, generator=g, device="cuda"),
                fc1_weight=randn(E, F, H, scale=H**-0.5), fc1_bias=randn(E, F, scale=0.1),
                fc2_weight=randn(E, H, I, scale=I**-0.5), fc2_bias=randn(E, H, scale=0.1))


def torch_moe(torch, x, shape: LayerShape):
    """Eager PyTorch MoE as a PyTorch deployment runs it: per-expert index + two linears + index_add."""
    F = torch.nn.functional
    weights, ids = torch.softmax(x["router_logits"].float(), dim=-1).topk(shape.K, dim=-1)  # [T, K]
    weights = weights / weights.sum(-1, keepdim=True)
    h = x["hidden"]
    out = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
    for e in range(shape.E):
        tok, slot = (ids == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        f = F.linear(h[tok], x["fc1_weight"][e], x["fc1_bias"][e])  # [n, F]
        a = F.silu(f[:, : shape.I]) * f[:, shape.I :] if shape.activation == 0 else F.gelu(f, approximate="tanh")
        y = F.linear(a, x["fc2_weight"][e], x["fc2_bias"][e])  # [n, H]
        out.index_add_(0, tok, weights[tok, slot, None] * y.float())
    return out.to(h.dtype)


def median_ms(torch, fn, iters: int) -> float:
    for _ in range(max(3, iters // 10)):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_gbps(device_name: str, override: float | None) -> float | None:
    if override:
        return override
    return next((gbps for fragment, gbps in PEAK_GBPS if fragment in device_name), None)


PATHS = {"auto": 0, "skinny": 1, "tiled": 2, "tiled_simt": 3}


def int4_experts(torch, x, group: int) -> dict:
    """The INT4 node's expert tensors for x's fp16 weights: int32 codes [E,N,K/8], fp16 scales [E,N,K/G]."""
    import numpy as np

    from calibration.blockwise import BlockQuant, quantize

    out = {}
    for name in ("fc1", "fc2"):
        codes, scales = quantize(x[f"{name}_weight"].cpu().numpy(), BlockQuant(4, group))
        out[f"{name}_codes"] = torch.from_numpy(np.ascontiguousarray(codes).view(np.int32)).cuda()
        out[f"{name}_scales"] = torch.from_numpy(scales.astype(np.float16)).cuda()
    return out


def bench_one(torch, ext, shape: LayerShape, T: int, dtype, iters: int, path: str, group: int | None) -> dict:
    x = make_layer(torch, shape, T, dtype)
    q = int4_experts(torch, x, group) if group else None

    def run_plugin():
        if q is None:
            return ext.moe_forward(**x, top_k=shape.K, activation=shape.activation, path=PATHS[path])
        return ext.moe_forward_int4(x["hidden"], x["router_logits"], q["fc1_codes"], q["fc1_scales"], x["fc1_bias"],
                                    q["fc2_codes"], q["fc2_scales"], x["fc2_bias"], top_k=shape.K,
                                    activation=shape.activation, group_size=group, path=PATHS[path])

    out, ids, _ = run_plugin()
    diff = (out.float() - torch_moe(torch, x, shape).float()).abs().max().item()
    experts_read = int(ids.unique().numel())
    es = x["hidden"].element_size()
    matrix = shape.F * shape.H + shape.H * shape.I
    per_weight = 0.5 + 2.0 / group if group else es  # INT4: half a byte of code + an fp16 scale per group
    weight_bytes = experts_read * (matrix * per_weight + (shape.F + shape.H) * es)
    io_bytes = 2 * T * shape.H * es + T * shape.E * 4
    flops = 2.0 * T * shape.K * (shape.F * shape.H + shape.H * shape.I)
    plugin_ms = median_ms(torch, run_plugin, iters)
    torch_ms = median_ms(torch, lambda: torch_moe(torch, x, shape), iters)
    total = weight_bytes + io_bytes
    return dict(T=T, plugin_ms=plugin_ms, torch_ms=torch_ms, experts=experts_read, mbytes=total / 1e6,
                gbps=total / plugin_ms / 1e6, tflops=flops / plugin_ms / 1e9, diff=diff)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="stablelm")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 8, 64, 577, 2048])
    ap.add_argument("--dtype", choices=["fp16", "fp32"], default="fp16")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--path", choices=["auto", "skinny", "tiled", "tiled_simt"], default="auto",
                    help="grouped-GEMM kernel (auto: skinny for T <= 8, else tiled; tiled uses tensor cores for fp16)")
    ap.add_argument("--weights", choices=["fp16", "int4"], default="fp16",
                    help="expert weights: as --dtype, or INT4 weight-only (needs --dtype fp16)")
    ap.add_argument("--group", type=int, choices=[32, 64, 128], default=128, help="INT4 group size")
    ap.add_argument("--peak-gbps", type=float, default=None, help="device memory bandwidth for the %% column")
    args = ap.parse_args(argv)
    if args.weights == "int4" and (args.dtype != "fp16" or args.path == "tiled_simt"):
        ap.error("--weights int4 needs --dtype fp16 and a path other than tiled_simt")
    group = args.group if args.weights == "int4" else None

    try:
        import torch
    except ImportError:
        fail("needs torch (pip install '.[torch]' with a CUDA build of torch)")
    if not torch.cuda.is_available():
        fail("no CUDA GPU (torch.cuda.is_available() is False); run it on a GPU machine")
    try:
        ext = load_kernels()
    except Exception as exc:  # compiler missing or failing: say so instead of a traceback
        fail(f"could not build the kernels with torch.utils.cpp_extension: {exc}")

    shape, dtype = MODELS[args.model], {"fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    name = torch.cuda.get_device_name()
    peak = peak_gbps(name, args.peak_gbps)
    print(f"{name} | {args.model}: H={shape.H} I={shape.I} E={shape.E} top-{shape.K} {args.dtype} | "
          f"{args.weights} experts{f' g{group}' if group else ''} | path {args.path} | peak {peak or '?'} GB/s | "
          f"median of {args.iters}")
    print(f"{'T':>6} {'plugin ms':>10} {'torch ms':>10} {'speed-up':>9} {'experts':>8} {'MB read':>9} "
          f"{'GB/s':>8} {'% peak':>7} {'TFLOP/s':>8} {'max|diff|':>10}")
    for T in args.tokens:
        r = bench_one(torch, ext, shape, T, dtype, args.iters, args.path, group)
        pct = f"{100 * r['gbps'] / peak:6.1f}%" if peak else "      ?"
        print(f"{r['T']:>6} {r['plugin_ms']:>10.4f} {r['torch_ms']:>10.4f} {r['torch_ms'] / r['plugin_ms']:>8.2f}x "
              f"{r['experts']:>8} {r['mbytes']:>9.1f} {r['gbps']:>8.1f} {pct:>7} {r['tflops']:>8.2f} "
              f"{r['diff']:>10.2e}")


if __name__ == "__main__":
    main()
