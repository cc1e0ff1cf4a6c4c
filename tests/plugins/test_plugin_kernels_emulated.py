"""The plugin's CUDA kernels, run on CPU threads (cuda_cpu_emulation.h), against the NumPy reference.

CI has no GPU, so this is where routing, permutation, both grouped-GEMM kernels, gather and combine are checked
for indexing and synchronisation bugs. It needs g++ and the CUDA headers (for cuda_fp16.h), not a GPU.
Numerics differ from a GPU only in fp32 rounding details; test_plugin_kernels_gpu.py covers the real device.
"""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from plugin_reference import ACTIVATIONS, MoeCase, assert_close_to_reference, reference_moe

PATHS = {"auto": 0, "skinny": 1, "tiled": 2, "tiled_simt": 3}


def run_case(driver, tmp_path, case: MoeCase, path: str = "auto", misalign: bool = False):
    for name, arr in zip(["hidden", "logits", "fc1_w", "fc1_b", "fc2_w", "fc2_b"], case.inputs()):
        np.ascontiguousarray(arr).tofile(tmp_path / f"{name}.bin")
    args = [case.T, case.E, case.K, case.H, case.I, int(case.dtype == "float16"), ACTIVATIONS[case.activation],
            int(case.normalize), PATHS[path], int(misalign), tmp_path]
    res = subprocess.run([str(driver), *map(str, args)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = np.fromfile(tmp_path / "out.bin", dtype=case.dtype).reshape(case.T, case.H)
    ids = np.fromfile(tmp_path / "topk_ids.bin", dtype=np.int32).reshape(case.T, case.K)
    weights = np.fromfile(tmp_path / "topk_w.bin", dtype=np.float32).reshape(case.T, case.K)
    return out, weights, ids


def check(driver, tmp_path, case: MoeCase, **kw) -> None:
    out, weights, ids = run_case(driver, tmp_path, case, **kw)
    ref, ref_w, ref_ids = reference_moe(case)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(weights, ref_w, rtol=1e-5, atol=1e-6)  # both fp32 softmax: a few ulp apart
    assert_close_to_reference(out, ref, case.dtype)


# (T, E, K, H, I, activation, dtype, path): decode (one row per expert), a few rows per expert, several 64-row
# tiles per expert, partial tiles in every dimension (H, I not multiples of 32/64), and the forced paths.
# fp16 "auto"/"tiled" with H, I multiples of 8 take the tensor-core (WMMA) kernel, "tiled_simt" the fp32-FMA one.
CASES = [
    (1, 4, 2, 64, 48, "swiglu", "float32", "auto"),
    (1, 8, 2, 64, 48, "swiglu", "float16", "auto"),
    (5, 8, 2, 40, 24, "gelu_tanh", "float16", "auto"),
    (13, 4, 2, 40, 24, "swiglu", "float32", "skinny"),
    (70, 4, 2, 72, 40, "swiglu", "float16", "auto"),
    (70, 4, 2, 72, 40, "swiglu", "float16", "tiled_simt"),
    (40, 4, 2, 48, 136, "gelu_tanh", "float16", "tiled"),
    (70, 4, 2, 72, 40, "gelu_erf", "float32", "tiled"),
    (3, 16, 1, 33, 17, "gelu_tanh", "float32", "tiled"),
]


@pytest.mark.parametrize("T,E,K,H,I,activation,dtype,path", CASES)
def test_matches_reference(driver, tmp_path, T, E, K, H, I, activation, dtype, path):
    check(driver, tmp_path, MoeCase(T, E, K, H, I, activation, dtype, seed=T + E), path=path)


@pytest.mark.parametrize("dtype,path", [("float16", "skinny"), ("float16", "tiled"), ("float32", "tiled")])
def test_unaligned_tensors_take_scalar_paths(driver, tmp_path, dtype, path):
    check(driver, tmp_path, MoeCase(6, 4, 2, 48, 32, "swiglu", dtype, seed=7), path=path, misalign=True)


def test_without_renormalisation(driver, tmp_path):
    check(driver, tmp_path, MoeCase(9, 4, 2, 32, 16, "gelu_tanh", "float32", normalize=False, seed=3))


def test_ties_pick_lower_expert(driver, tmp_path):
    case = MoeCase(4, 8, 2, 32, 16, "swiglu", "float32", seed=1)
    case.logits[:] = 0.5  # every expert equally likely
    case.logits[1, 5] = case.logits[1, 6] = 3.0  # a tie at the top: 5 before 6
    _, weights, ids = run_case(driver, tmp_path, case)
    assert ids[0].tolist() == [0, 1] and ids[1].tolist() == [5, 6]
    np.testing.assert_allclose(weights, 0.5, rtol=1e-6)
    check(driver, tmp_path, case)


def test_ties_within_one_lane_pick_lower_expert(driver, tmp_path):
    case = MoeCase(2, 40, 2, 32, 16, "gelu_tanh", "float32", seed=4)
    case.logits[:] = 0.0
    case.logits[:, 1] = case.logits[:, 33] = 3.0  # experts 1 and 33 share routing lane 1 (E > 32)
    _, _, ids = run_case(driver, tmp_path, case)
    assert ids.tolist() == [[1, 33], [1, 33]]


def test_all_tokens_to_one_expert(driver, tmp_path):
    case = MoeCase(80, 4, 1, 32, 16, "swiglu", "float16", seed=2)
    case.logits[:, 2] += 50.0  # expert 2 gets 80 rows (two tiles), the others none
    check(driver, tmp_path, case, path="tiled")


def test_zero_tokens(driver, tmp_path):
    out, _, _ = run_case(driver, tmp_path, MoeCase(0, 4, 2, 32, 16))
    assert out.shape == (0, 32)


@pytest.mark.parametrize("activation,k,bias", [("swiglu", 2, False), ("gelu_tanh", 2, True), ("gelu_erf", 1, True)])
def test_matches_project_moe_layer(driver, tmp_path, activation, k, bias):
    """Same numbers as moe_llava.moe.MoELayer (eval, dropless) with the exporter's attributes (normalise iff k > 1)."""
    import torch

    from moe_llava import moe
    torch.manual_seed(0)
    layer = moe.MoELayer(hidden_size=48, ffn_size=40, num_experts=4, top_k=k, activation=activation, bias=bias).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.2)  # the default init (std 0.02) would make every output ~1e-4
        x = torch.randn(11, 48)
        expected = layer(x).numpy()
        logits = layer.router_logits(x)
    case = MoeCase(11, 4, k, 48, 40, activation, "float32", normalize=k > 1)
    case.hidden, case.logits = x.numpy(), logits.numpy()
    case.fc1_w, case.fc2_w = layer.fc1_weight.detach().numpy(), layer.fc2_weight.detach().numpy()
    if bias:
        case.fc1_b, case.fc2_b = layer.fc1_bias.detach().numpy(), layer.fc2_bias.detach().numpy()
    else:
        case.fc1_b, case.fc2_b = np.zeros_like(case.fc1_b), np.zeros_like(case.fc2_b)
    out, _, _ = run_case(driver, tmp_path, case)
    assert_close_to_reference(out, expected.astype(np.float64), "float32")


@pytest.mark.parametrize("T, E, K, H, I, dtype", [(1, 4, 2, 64, 96, "float16"), (577, 4, 2, 72, 40, "float32"),
                                                  (7, 8, 1, 32, 48, "float16")])
def test_workspace_arithmetic_matches_the_plugin(driver, tmp_path, T, E, K, H, I, dtype):
    """runtime/tensorrt/memory.py's moe_workspace_bytes (what the memory plan and the --workspace-mb check use)
    is the plugin's own moeWorkspaceSize."""
    from runtime.tensorrt.memory import moe_workspace_bytes
    case = MoeCase(T, E, K, H, I, "swiglu", dtype)
    for name, arr in zip(["hidden", "logits", "fc1_w", "fc1_b", "fc2_w", "fc2_b"], case.inputs()):
        np.ascontiguousarray(arr).tofile(tmp_path / f"{name}.bin")
    args = [T, E, K, H, I, int(dtype == "float16"), ACTIVATIONS["swiglu"], 1, PATHS["auto"], 0, tmp_path]
    res = subprocess.run([str(driver), *map(str, args)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    reported = int(res.stdout.split("workspace_bytes")[1].split()[0])
    assert moe_workspace_bytes(T, E, K, H, I, np.dtype(dtype).itemsize) == reported
