"""NumPy reference of the MoE plugin node and its random inputs, shared by the plugin tests.

Shape legend: T tokens, E experts, K experts per token, H hidden, I expert intermediate, F fc1 rows (2I SwiGLU, I GELU).
The reference is written from the node contract (runtime/plugins/README.md), independently of the CUDA code.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
PLUGIN_DIR = REPO / "runtime" / "plugins"
ACTIVATIONS = {"swiglu": 0, "gelu_tanh": 1, "gelu_erf": 2}


def cuda_include_dir() -> Path | None:
    """Directory holding cuda_runtime_api.h: $CUDA_HOME / $CUDA_PATH, next to nvcc, or /usr/local/cuda."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parents[1]))
    candidates.append("/usr/local/cuda")
    for root in filter(None, candidates):
        inc = Path(root) / "include"
        if (inc / "cuda_runtime_api.h").is_file() and (inc / "cuda_fp16.h").is_file():
            return inc
    return None


@dataclass
class MoeCase:
    """One MoE node invocation: sizes, attributes and the six inputs (IO dtype fp16 or fp32)."""

    T: int
    E: int
    K: int
    H: int
    I: int
    activation: str = "swiglu"
    dtype: str = "float32"
    normalize: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        F = 2 * self.I if self.activation == "swiglu" else self.I
        io = np.dtype(self.dtype)
        # ~1/sqrt(fan_in) weights keep every activation O(1), so fp16 tolerances are relative to O(1) values.
        self.hidden = rng.standard_normal((self.T, self.H)).astype(io)
        self.logits = (2.0 * rng.standard_normal((self.T, self.E))).astype(np.float32)
        self.fc1_w = (rng.standard_normal((self.E, F, self.H)) / math.sqrt(self.H)).astype(io)
        self.fc1_b = (0.1 * rng.standard_normal((self.E, F))).astype(io)
        self.fc2_w = (rng.standard_normal((self.E, self.H, self.I)) / math.sqrt(self.I)).astype(io)
        self.fc2_b = (0.1 * rng.standard_normal((self.E, self.H))).astype(io)

    def inputs(self) -> list[np.ndarray]:
        return [self.hidden, self.logits, self.fc1_w, self.fc1_b, self.fc2_w, self.fc2_b]


@dataclass
class Int4Experts:
    """A case's expert weights quantised as the INT4 node carries them (calibration/blockwise.py's quantiser).

    codes uint8 [E, N, K/2] (the node's int32 [E, N, K/8] words, byte for byte), scales fp16 [E, N, K/G], and
    `case` a copy of the original whose fc1_w/fc2_w are the dequantised float32 weights - the reference's input.
    """

    fc1_codes: np.ndarray
    fc1_scales: np.ndarray
    fc2_codes: np.ndarray
    fc2_scales: np.ndarray
    case: MoeCase


def quantize_int4(case: MoeCase, group: int) -> Int4Experts:
    from calibration.blockwise import BlockQuant, dequantize, quantize

    spec = BlockQuant(4, group)
    c1, s1 = quantize(case.fc1_w.astype(np.float16), spec)
    c2, s2 = quantize(case.fc2_w.astype(np.float16), spec)
    ref = copy.copy(case)
    ref.fc1_w, ref.fc2_w = dequantize(c1, s1, spec), dequantize(c2, s2, spec)
    return Int4Experts(c1, s1.astype(np.float16), c2, s2.astype(np.float16), ref)


def route(logits: np.ndarray, k: int, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """fp32 softmax over E, top-k (ties -> lower expert index), optional renormalisation. -> (weights, ids) [T, K]"""
    logits = logits.astype(np.float32)
    ex = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs = ex / ex.sum(axis=-1, keepdims=True)  # [T, E] fp32
    ids = np.argsort(-probs, axis=-1, kind="stable")[:, :k]  # stable sort keeps the lower index first on ties
    p = np.take_along_axis(probs, ids, axis=-1)
    weights = p / p.sum(axis=-1, keepdims=True) if normalize else p
    return weights.astype(np.float32), ids.astype(np.int32)


def activate(f: np.ndarray, activation: str, inter: int) -> np.ndarray:
    """fc1 output [n, F] -> [n, I]."""
    if activation == "swiglu":
        gate, up = f[:, :inter], f[:, inter:]  # concatenated halves
        return gate / (1.0 + np.exp(-gate)) * up
    if activation == "gelu_tanh":
        return 0.5 * f * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (f + 0.044715 * f**3)))
    erf = np.vectorize(math.erf)
    return 0.5 * f * (1.0 + erf(f / math.sqrt(2.0)))


def reference_moe(case: MoeCase) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 expert math on the case's (possibly fp16) values. -> (output [T, H] float64, weights, ids)."""
    weights, ids = route(case.logits, case.K, case.normalize)
    x = case.hidden.astype(np.float64)
    out = np.zeros((case.T, case.H))
    for e in range(case.E):
        tok, slot = np.nonzero(ids == e)  # tokens routed to e and at which k
        if tok.size == 0:
            continue
        f = x[tok] @ case.fc1_w[e].astype(np.float64).T + case.fc1_b[e]  # [n, F]
        y = activate(f, case.activation, case.I) @ case.fc2_w[e].astype(np.float64).T + case.fc2_b[e]  # [n, H]
        np.add.at(out, tok, weights[tok, slot, None] * y)
    return out, weights, ids


def assert_close_to_reference(out: np.ndarray, ref: np.ndarray, dtype: str) -> None:
    """Tolerances relative to the output scale (values are O(1) by construction).

    fp32: fp32 accumulation in a different order than float64 gives ~1e-6 relative error; 1e-4 leaves margin for
    H, I up to a few thousand. fp16: inputs are exact in the reference, but the kernel rounds act(fc1) and each
    expert output to fp16 (2^-11 ~ 5e-4 relative each) and the final output once more: ~1e-3, bounded by 1e-2.
    """
    tol = 1e-4 if dtype == "float32" else 1e-2
    scale = max(1.0, float(np.abs(ref).max()))
    err = np.abs(out.astype(np.float64) - ref)
    bad = err > tol * scale + tol * np.abs(ref)
    assert not bad.any(), (f"{bad.sum()} of {bad.size} outside tolerance {tol}: "
                           f"max abs err {err.max():.3e} (scale {scale:.3f})")



def tensorrt_include_dir() -> Path | None:
    """Directory holding NvInferRuntime.h: $TENSORRT_INCLUDE_DIR, $TENSORRT_ROOT/include or a system location."""
    candidates = [os.environ.get("TENSORRT_INCLUDE_DIR")]
    if os.environ.get("TENSORRT_ROOT"):
        candidates.append(os.path.join(os.environ["TENSORRT_ROOT"], "include"))
    candidates += ["/usr/include/x86_64-linux-gnu", "/usr/include/aarch64-linux-gnu", "/usr/include",
                   "/usr/local/tensorrt/include", "/opt/tensorrt/include"]
    for inc in filter(None, candidates):
        if (Path(inc) / "NvInferRuntime.h").is_file():
            return Path(inc)
    return None
