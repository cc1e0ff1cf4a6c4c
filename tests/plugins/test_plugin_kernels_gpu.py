"""The plugin's CUDA kernels on a real GPU against a PyTorch reference (verification rung 2).

Builds tests/plugins/moe_kernels_binding.cpp + runtime/plugins/moe_kernels.cu with torch.utils.cpp_extension (about
a minute, cached by torch afterwards) and sweeps T in {1,2,7,64,577,2048}, E in {4,8,16}, k in {1,2}, fp16/fp32,
SwiGLU and GELU-tanh. Skips wherever torch.cuda.is_available() is false - every CI run and development machine.
"""

from __future__ import annotations

import pytest

from plugin_reference import PLUGIN_DIR

import torch
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA GPU (torch.cuda.is_available() is False)")

ACT = {"swiglu": 0, "gelu_tanh": 1, "gelu_erf": 2}
PATH = {"auto": 0, "skinny": 1, "tiled": 2, "tiled_simt": 3}
HERE = PLUGIN_DIR.parents[1] / "tests" / "plugins"


@pytest.fixture(scope="module")
def ext():
    from torch.utils.cpp_extension import load

    sources = [str(HERE / "moe_kernels_binding.cpp"), str(PLUGIN_DIR / "moe_kernels.cu")]
    return load(name="moe_llava_kernels_test", sources=sources,
                extra_include_paths=[str(PLUGIN_DIR)], extra_cflags=["-O2"], extra_cuda_cflags=["-O3"], verbose=False)


def make_inputs(T, E, H, I, activation, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    F = 2 * I if activation == "swiglu" else I

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, device="cuda")).to(dtype)

    # ~1/sqrt(fan_in) weights keep activations O(1), so tolerances can be relative to O(1) values.
    return dict(hidden=randn(T, H), router_logits=(2 * torch.randn(T, E, generator=g, device="cuda")).float(),
                fc1_weight=randn(E, F, H, scale=H**-0.5), fc1_bias=randn(E, F, scale=0.1),
                fc2_weight=randn(E, H, I, scale=I**-0.5), fc2_bias=randn(E, H, scale=0.1))


def reference_probs(logits):
    return torch.softmax(logits.float(), dim=-1)  # [T, E] fp32, as the project's router


def reference_output(x, ids, weights, activation):
    """float64 expert math for the given routing: sum_k w[t,k] * fc2_e(act(fc1_e(x_t))). -> [T, H]"""
    I = x["fc2_weight"].shape[2]
    h = x["hidden"].double()
    out = torch.zeros_like(h)
    for e in ids.unique().tolist():
        tok, slot = (ids == e).nonzero(as_tuple=True)
        f = h[tok] @ x["fc1_weight"][e].double().T + x["fc1_bias"][e].double()  # [n, F]
        if activation == "swiglu":
            a = torch.nn.functional.silu(f[:, :I]) * f[:, I:]
        elif activation == "gelu_tanh":
            a = torch.nn.functional.gelu(f, approximate="tanh")
        else:
            a = torch.nn.functional.gelu(f)
        y = a @ x["fc2_weight"][e].double().T + x["fc2_bias"][e].double()  # [n, H]
        out.index_add_(0, tok, weights[tok, slot, None].double() * y)
    return out


def check_routing(probs, ids, weights, k, normalize=True):
    """The kernel's experts must be a top-k of the fp32 probabilities. Near-ties (probabilities within 1e-6, where
    the kernel's and torch's fp32 softmax may round differently) may order differently; nothing else may."""
    ref_p, ref_ids = probs.topk(k, dim=-1)
    got_p = probs.gather(-1, ids.long())
    torch.testing.assert_close(got_p, ref_p, rtol=0, atol=1e-6)
    mismatch = (ids.long() != ref_ids).any(-1).float().mean().item()
    assert mismatch < 1e-2, f"{mismatch:.1%} of tokens routed differently from torch.topk"
    expect = got_p / got_p.sum(-1, keepdim=True) if normalize else got_p
    torch.testing.assert_close(weights, expect, rtol=1e-5, atol=1e-6)  # fp32 both ways: a few ulp


def assert_output_close(out, ref, dtype):
    # fp32: fp32 accumulation vs float64 reference, sums over H and I of a few thousand terms -> ~1e-6 relative;
    # 1e-4 leaves margin. fp16: the kernel rounds act(fc1) and each expert output to fp16 (2^-11 ~ 5e-4 relative
    # each) and the final output once more -> ~1e-3 of the O(1) output scale; 1e-2 bounds it.
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    scale = max(1.0, ref.abs().max().item())
    err = (out.double() - ref).abs()
    bad = err > tol * scale + tol * ref.abs()
    assert not bad.any(), (f"{int(bad.sum())} of {bad.numel()} outside {tol}: "
                           f"max err {err.max().item():.3e} (scale {scale:.2f})")


def run_and_check(ext, T, E, K, H, I, activation, dtype, path="auto", normalize=True, seed=0):
    x = make_inputs(T, E, H, I, activation, dtype, seed)
    out, ids, weights = ext.moe_forward(**x, top_k=K, activation=ACT[activation], normalize=normalize, path=PATH[path])
    torch.cuda.synchronize()
    check_routing(reference_probs(x["router_logits"]), ids, weights, K, normalize)
    assert_output_close(out, reference_output(x, ids.long(), weights, activation), dtype)


@pytest.mark.parametrize("T", [1, 2, 7, 64, 577, 2048])
@pytest.mark.parametrize("E", [4, 8, 16])
@pytest.mark.parametrize("K", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("activation", ["swiglu", "gelu_tanh"])
def test_kernels_match_reference(ext, T, E, K, dtype, activation):
    run_and_check(ext, T, E, K, H=128, I=96, activation=activation, dtype=dtype, seed=T * 31 + E)


@pytest.mark.parametrize("path", ["skinny", "tiled", "tiled_simt"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("T", [1, 5, 70])
def test_forced_paths_agree(ext, T, dtype, path):
    # fp16 "tiled" is the tensor-core kernel, "tiled_simt" the fp32-FMA one; both must meet the same tolerance.
    run_and_check(ext, T, 8, 2, H=200, I=136, activation="gelu_erf", dtype=dtype, path=path, normalize=False)


@pytest.mark.parametrize("T", [1, 577])
def test_stablelm_sized_layer(ext, T):
    # MoE-LLaVA-StableLM-1.6B MoE layer: H 2048, I 5632, 4 experts, top-2, SwiGLU, fp16.
    run_and_check(ext, T, 4, 2, H=2048, I=5632, activation="swiglu", dtype=torch.float16)


def test_odd_sizes_use_scalar_paths(ext):
    # H and I not multiples of 8: no 16-byte vector loads.
    for T in (1, 3, 100):
        run_and_check(ext, T, 4, 2, H=66, I=42, activation="swiglu", dtype=torch.float16)


def test_decode_reads_only_selected_experts(ext):
    """T=1 time must not grow with E: the kernels read k experts' weights, not E. At StableLM size one expert is
    69 MB, so reading all 32 would take ~0.7 ms on an H100 against ~0.05 ms for two."""
    H, I = 2048, 5632

    def time_ms(E):
        x = make_inputs(1, E, H, I, "swiglu", torch.float16)
        for _ in range(5):
            ext.moe_forward(**x, top_k=2, activation=0)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(50):
            ext.moe_forward(**x, top_k=2, activation=0)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 50

    t4, t32 = time_ms(4), time_ms(32)
    assert t32 < 2.0 * t4, f"decode with 32 experts took {t32:.3f} ms vs {t4:.3f} ms with 4"


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("activation,k,bias", [("swiglu", 2, False), ("gelu_tanh", 2, True), ("gelu_erf", 1, True)])
@pytest.mark.parametrize("T", [1, 300])
def test_matches_project_moe_layer(ext, T, activation, k, bias, dtype):
    """Same numbers as moe_llava.moe.MoELayer on the GPU, with the exporter's attributes (normalise iff k > 1)."""
    moe = pytest.importorskip("moe_llava.moe")
    torch.manual_seed(T)
    layer = moe.MoELayer(hidden_size=256, ffn_size=192, num_experts=4, top_k=k, activation=activation, bias=bias)
    layer = layer.eval().cuda()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.normal_(0.0, 0.05 if name != "router.weight" else 0.2)
        layer.fc1_weight.data, layer.fc2_weight.data = layer.fc1_weight.to(dtype), layer.fc2_weight.to(dtype)
        if bias:
            layer.fc1_bias.data, layer.fc2_bias.data = layer.fc1_bias.to(dtype), layer.fc2_bias.to(dtype)
        x = torch.randn(T, 256, device="cuda").to(dtype)
        expected = layer(x).double()
        logits = layer.router_logits(x)
        zeros = [torch.zeros(4, n, device="cuda", dtype=dtype) for n in (layer.fc1_weight.shape[1], 256)]
        out, _, _ = ext.moe_forward(x, logits, layer.fc1_weight, layer.fc1_bias if bias else zeros[0],
                                    layer.fc2_weight, layer.fc2_bias if bias else zeros[1], top_k=k,
                                    activation=ACT[activation], normalize=k > 1)
    assert_output_close(out, expected, dtype)
