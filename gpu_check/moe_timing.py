"""Step `moe-timing`: the plugin's MoE layer against PyTorch's (moe_llava.moe.MoELayer) at the StableLM shape.

H 2048, I 5632, 4 experts, top-2, SwiGLU, fp16 weights (router fp32, as the model keeps it), T = 1 (decode) and
577 (one image's prefill). Both sides include the router linear. CUDA-event medians; the plugin's achieved GB/s
over the expert weights it must read, against the device's DRAM bandwidth.
"""

from __future__ import annotations

from benchmarks.plugin_kernels import MODELS, median_ms, peak_gbps
from gpu_check.common import PLUGIN_DIR, PLUGIN_TESTS, StepFailed

TOKENS = (1, 577)
DEVICE = "cuda"  # a module constant so a dry run can point the step at the CPU with stand-in kernels
ITERS = {1: 200, 577: 50}
TOLERANCE = 2e-2  # of the O(1) output scale: both sides round intermediates to fp16 (~1e-3 expected)


def load_extension():
    """The kernel extension with exactly the test fixture's arguments, so torch reuses the kernel sweep's build."""
    from torch.utils.cpp_extension import load

    sources = [str(PLUGIN_TESTS / "moe_kernels_binding.cpp"), str(PLUGIN_DIR / "moe_kernels.cu")]
    return load(name="moe_llava_kernels_test", sources=sources, extra_include_paths=[str(PLUGIN_DIR)],
                extra_cflags=["-O2"], extra_cuda_cflags=["-O3"], verbose=False)


def stablelm_layer(torch):
    from moe_llava.moe import MoELayer

    s = MODELS["stablelm"]
    layer = MoELayer(hidden_size=s.H, ffn_size=s.I, num_experts=s.E, top_k=s.K, activation="swiglu", bias=False)
    layer = layer.eval().to(DEVICE)
    with torch.no_grad():  # ~1/sqrt(fan_in) weights keep the output O(1), so the tolerance is relative to 1
        layer.fc1_weight.normal_(0.0, s.H**-0.5)
        layer.fc2_weight.normal_(0.0, s.I**-0.5)
        layer.router.weight.normal_(0.0, 2 * s.H**-0.5)
        layer.fc1_weight.data = layer.fc1_weight.data.half()
        layer.fc2_weight.data = layer.fc2_weight.data.half()
    return layer


def time_tokens(torch, ext, layer, T: int, peak: float | None) -> dict:
    s = MODELS["stablelm"]
    x = torch.randn(T, s.H, device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(T)).half()

    def plugin():
        return ext.moe_forward(x, layer.router_logits(x), layer.fc1_weight, None, layer.fc2_weight, None,
                               top_k=s.K, activation=0, normalize=True)

    with torch.inference_mode():
        expected = layer(x).float()
        out, ids, _ = plugin()
        diff = (out.float() - expected).abs().max().item()
        scale = max(1.0, expected.abs().max().item())
        plugin_ms = median_ms(torch, plugin, ITERS[T])
        torch_ms = median_ms(torch, lambda: layer(x), ITERS[T])
    experts = int(ids.unique().numel())
    read = experts * (s.F * s.H + s.H * s.I) * 2 + 2 * T * s.H * 2  # fp16 expert weights + hidden in/out
    r = dict(tokens=T, plugin_ms=plugin_ms, torch_ms=torch_ms, speedup=torch_ms / plugin_ms, experts_read=experts,
             mbytes_read=read / 1e6, plugin_gbps=read / plugin_ms / 1e6, torch_gbps=read / torch_ms / 1e6,
             plugin_tflops=2.0 * T * s.K * (s.F * s.H + s.H * s.I) / plugin_ms / 1e9, max_abs_diff=diff,
             output_scale=scale)
    if peak:
        r.update(peak_gbps=peak, plugin_pct_of_peak=100 * r["plugin_gbps"] / peak)
    if diff > TOLERANCE * scale:
        raise StepFailed(f"T={T}: plugin and PyTorch MoE layers differ by {diff:.3e} (> {TOLERANCE} x {scale:.2f})",
                         r)
    return r


def run() -> tuple[str, dict]:
    import torch

    if not torch.cuda.is_available():
        raise StepFailed("torch sees no CUDA GPU (torch.cuda.is_available() is False)")
    name = torch.cuda.get_device_name()
    figures = {"device": name, "torch": torch.__version__, "torch_cuda": torch.version.cuda,
               "shape": "StableLM H2048 I5632 E4 top-2 SwiGLU fp16", "timing": "CUDA events, median"}
    ext = load_extension()
    layer = stablelm_layer(torch)
    peak = peak_gbps(name, None)
    for T in TOKENS:
        figures[f"T{T}"] = time_tokens(torch, ext, layer, T, peak)
    parts = [f"T={T}: plugin {figures[f'T{T}']['plugin_ms']:.3f} ms vs torch {figures[f'T{T}']['torch_ms']:.3f} ms "
             f"({figures[f'T{T}']['plugin_gbps']:.0f} GB/s)" for T in TOKENS]
    return "; ".join(parts) + (f"; peak {peak:.0f} GB/s" if peak else ""), figures
