"""INT4 weight-only experts of the plugin kernels on a real GPU against a PyTorch reference (verification rung 2).

The experts are quantised by calibration/blockwise.py (the exporter's quantiser: symmetric, group-wise, centre 8)
and the float64 reference runs on its dequantised weights, so the check is the kernels' reading of the packed
layout and their arithmetic; the quantisation error is common to both. Uses the extension of
test_plugin_kernels_gpu.py (moe_kernels_binding.cpp: moe_forward_int4) and its reference and tolerances.
Skips wherever torch.cuda.is_available() is false.
"""

from __future__ import annotations

import numpy as np
import pytest

from calibration.blockwise import BlockQuant, dequantize, quantize

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA GPU (torch.cuda.is_available() is False)")

from test_plugin_kernels_gpu import (ACT, PATH, assert_output_close, check_routing, ext,  # noqa: E402,F401
                                     make_inputs, reference_output, reference_probs)


def quantize_experts(x, group):
    """fp16 fc1/fc2 weights -> the INT4 node's tensors (int32 codes [E,N,K/8], fp16 scales [E,N,K/G]) and a copy
    of x whose weights are the dequantised values (the reference's input)."""
    spec, q, ref = BlockQuant(4, group), {}, dict(x)
    for name in ("fc1", "fc2"):
        w = x[f"{name}_weight"].cpu().numpy().astype(np.float16)
        codes, scales = quantize(w, spec)  # uint8 [E,N,K/2]: the int32 words' bytes, little-endian
        q[f"{name}_codes"] = torch.from_numpy(np.ascontiguousarray(codes).view(np.int32)).cuda()
        q[f"{name}_scales"] = torch.from_numpy(scales.astype(np.float16)).cuda()
        ref[f"{name}_weight"] = torch.from_numpy(dequantize(codes, scales, spec)).cuda()
    return q, ref


def run_and_check(ext, T, E, K, H, I, activation, group, path="auto", normalize=True, seed=0):
    x = make_inputs(T, E, H, I, activation, torch.float16, seed)
    q, ref = quantize_experts(x, group)
    out, ids, weights = ext.moe_forward_int4(
        x["hidden"], x["router_logits"], q["fc1_codes"], q["fc1_scales"], x["fc1_bias"], q["fc2_codes"],
        q["fc2_scales"], x["fc2_bias"], top_k=K, activation=ACT[activation], normalize=normalize, group_size=group,
        path=PATH[path])
    torch.cuda.synchronize()
    check_routing(reference_probs(x["router_logits"]), ids, weights, K, normalize)
    # fp16 tolerance of the fp16 experts: the same roundings plus, on the tensor-core path, each dequantised
    # weight rounded to fp16 (~2^-12 relative, uncorrelated along a dot product).
    assert_output_close(out, reference_output(ref, ids.long(), weights, activation), torch.float16)
    return out, x, ids, weights


@pytest.mark.parametrize("T", [1, 2, 7, 8, 9, 64, 577, 2048])
@pytest.mark.parametrize("E", [4, 8, 16])
@pytest.mark.parametrize("K", [1, 2])
@pytest.mark.parametrize("activation", ["swiglu", "gelu_tanh", "gelu_erf"])
def test_int4_kernels_match_reference(ext, T, E, K, activation):
    # T <= 8 the decode kernel, T > 8 the tensor-core tiles dequantising in shared memory.
    run_and_check(ext, T, E, K, H=256, I=128, activation=activation, group=64, seed=T * 31 + E)


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("path", ["skinny", "tiled"])
@pytest.mark.parametrize("T", [1, 5, 70])
def test_int4_group_sizes_and_forced_paths(ext, T, path, group):
    # H = 384, I = 640: rows of 12 and 20 loads of 32 weights, not a multiple of the warp's 1024-weight stride.
    run_and_check(ext, T, 8, 2, H=384, I=640, activation="gelu_erf", group=group, path=path, normalize=False)


@pytest.mark.parametrize("T", [1, 577])
def test_int4_stablelm_sized_layer(ext, T):
    # MoE-LLaVA-StableLM-1.6B MoE layer: H 2048, I 5632, 4 experts, top-2, SwiGLU; group 128 as exported.
    run_and_check(ext, T, 4, 2, H=2048, I=5632, activation="swiglu", group=128)


def test_int4_output_tracks_fp16_experts(ext):
    """Against the fp16 experts (not the dequantised ones) the INT4 output moves by the quantisation error only.
    Group-128 round-to-nearest of Gaussian weights adds ~10% relative noise per matrix; through fc1, SwiGLU and fc2
    that is a cosine similarity of 0.984-0.985 with fp16 (NumPy, same sizes, 3 seeds); 0.97 leaves margin."""
    out, x, _, _ = run_and_check(ext, 64, 8, 2, H=512, I=256, activation="swiglu", group=128)
    fp16, _, _ = ext.moe_forward(**x, top_k=2, activation=ACT["swiglu"])
    cos = torch.nn.functional.cosine_similarity(out.double().flatten(), fp16.double().flatten(), dim=0).item()
    assert 0.97 < cos < 0.999, cos  # < 0.999: the codes were really used


def test_int4_refuses_bad_group(ext):
    x = make_inputs(2, 4, 96, 64, "swiglu", torch.float16)
    q, _ = quantize_experts(x, 32)
    with pytest.raises(RuntimeError, match="moeForward failed"):  # H = 96 is not a multiple of 64
        ext.moe_forward_int4(x["hidden"], x["router_logits"], q["fc1_codes"], torch.zeros(4, 128, 1).half().cuda(),
                             None, q["fc2_codes"], torch.zeros(4, 96, 1).half().cuda(), None, top_k=2,
                             group_size=64)
