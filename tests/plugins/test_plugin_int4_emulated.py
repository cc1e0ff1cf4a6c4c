"""INT4 weight-only experts of the plugin kernels, run on CPU threads (cuda_cpu_emulation.h), against NumPy.

The experts are quantised by calibration/blockwise.py (the quantiser the exporter uses) and the reference runs the
float64 MoE on its dequantised weights, so what is checked is the kernels' reading of the packed layout (nibble
order, group scales, centre 8) and their arithmetic - not the quantisation error, which both sides share.
Every activation x E in {4, 8, 16} x T in {1, 7, 577}: T 1 and 7 take the decode kernel, 577 the tensor-core tiles;
group sizes 32, 64 and 128 on both paths.
"""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from plugin_reference import ACTIVATIONS, MoeCase, assert_close_to_reference, quantize_int4, reference_moe

PATHS = {"auto": 0, "skinny": 1, "tiled": 2}


def run_int4(driver, tmp_path, case: MoeCase, group: int, path: str = "auto"):
    """Runs the INT4 node on `case` (fp16) -> (output [T, H] fp16, reference output float64)."""
    q = quantize_int4(case, group)
    files = {"hidden": case.hidden, "logits": case.logits, "fc1_w": q.fc1_codes, "fc1_b": case.fc1_b,
             "fc2_w": q.fc2_codes, "fc2_b": case.fc2_b, "fc1_s": q.fc1_scales, "fc2_s": q.fc2_scales}
    for name, arr in files.items():
        np.ascontiguousarray(arr).tofile(tmp_path / f"{name}.bin")
    args = [case.T, case.E, case.K, case.H, case.I, 1, ACTIVATIONS[case.activation], int(case.normalize),
            PATHS[path], 0, tmp_path, 4, group]
    res = subprocess.run([str(driver), *map(str, args)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    out = np.fromfile(tmp_path / "out.bin", dtype=np.float16).reshape(case.T, case.H)
    ids = np.fromfile(tmp_path / "topk_ids.bin", dtype=np.int32).reshape(case.T, case.K)
    ref, _, ref_ids = reference_moe(q.case)
    np.testing.assert_array_equal(ids, ref_ids)
    return out, ref


# Tolerance: assert_close_to_reference's fp16 bound (1e-2 of the O(1) output scale). The reference uses the
# same dequantised weights exactly; the kernels add the fp16 roundings of act(fc1), the expert outputs and the
# output (as for fp16 experts), and the tensor-core path rounds each dequantised weight (code-8)*scale to fp16
# (2^-12 relative on average, uncorrelated across a dot product): ~1e-3 in all.
@pytest.mark.parametrize("activation", ["swiglu", "gelu_tanh", "gelu_erf"])
@pytest.mark.parametrize("E", [4, 8, 16])
@pytest.mark.parametrize("T", [1, 7, 577])
def test_int4_experts_match_reference(driver, tmp_path, T, E, activation):
    # H = 64, I = 32, group 32: two groups per fc1 row, one per fc2 row; small, as the emulation runs every thread
    # (the T = 577 cases take ~2 s of CPU each).
    case = MoeCase(T, E, 2, 64, 32, activation, "float16", seed=T * 7 + E)
    out, ref = run_int4(driver, tmp_path, case, group=32)
    assert_close_to_reference(out, ref, "float16")


@pytest.mark.parametrize("group", [64, 128])
@pytest.mark.parametrize("path", ["skinny", "tiled"])
def test_group_sizes_and_forced_paths(driver, tmp_path, group, path):
    # H = I = 128: several 32-weight loads per group and (group 64) two groups per row; T = 20 makes the skinny
    # kernel walk row chunks of 8 and the tiles cover partial 64-row tiles.
    case = MoeCase(20, 4, 2, 128, 128, "gelu_tanh", "float16", seed=group)
    out, ref = run_int4(driver, tmp_path, case, group=group, path=path)
    assert_close_to_reference(out, ref, "float16")


def test_int4_differs_from_float_experts(driver, tmp_path):
    """The reference above is the dequantised model, not the float one: INT4 must move the output measurably
    (group-32 RTN on Gaussian weights: ~10% relative weight error), so a kernel ignoring the codes would fail."""
    case = MoeCase(3, 4, 2, 64, 32, "gelu_tanh", "float16", seed=5)
    out, _ = run_int4(driver, tmp_path, case, group=32)
    float_ref, _, _ = reference_moe(case)
    rel = np.abs(out - float_ref).max() / np.abs(float_ref).max()
    assert 0.01 < rel < 0.5, rel
