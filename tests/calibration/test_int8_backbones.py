"""Weight-only int8 on a tiny checkpoint of each backbone (StableLM, Phi-2, Qwen-1), no calibration data.

Random tiny models have near-flat logits: PyTorch's own top-2 logits are a median 0.14-0.17 apart (demo model:
1.73) and 19-29 % of positions are under 0.05; the int8 answers part from PyTorch only at margins of
0.004-0.024. So issue 15's plain greedy target (>= 0.95) is not a measure of int8 on them: it swings with
which near-tie flips (block 128 everywhere: 0.73 / 0.38 / 0.88; the shipped plan 0.52 / 0.48 / 1.0;
teacher-forced per position 0.92 / 0.94 / 1.0 - see README, Quantised exports). What is asserted: the logits
stay close (cosine), and int8 never flips a token PyTorch is confident about (every divergence at a margin
under CONFIDENT_LOGITS).
"""
import pytest

from calibration.quantize import quantize_export
from calibration.validation import logit_cosine
from export.validate import greedy_agreement, sample_images
from tiny import write_tiny_checkpoint

pytestmark = pytest.mark.slow
MIN_COSINE = 0.999        # measured 0.99959 (Qwen-1) - 0.99978 (Phi-2)
CONFIDENT_LOGITS = 0.1    # 4x the largest margin a flip was measured at


def tiny_fp32_export(family: str, directory):
    """(loaded tiny checkpoint, its fp32 `ort` export dir), 2 layers."""
    from export.moe_lowering import MoEImpl
    from export.onnx_export import Precision, write_export
    from moe_llava.loading import load_pretrained
    write_tiny_checkpoint(directory / "ckpt", family, num_hidden_layers=2)
    loaded = load_pretrained(directory / "ckpt")
    (directory / "fp32").mkdir()
    write_export(loaded, directory / "fp32", MoEImpl.ORT, Precision.FP32)
    return loaded, directory / "fp32"


@pytest.mark.parametrize("family", ["stablelm", "phi", "qwen"])
def test_int8_keeps_the_logits_and_confident_tokens(family, tmp_path, tiny_loaded, fp32_exports):
    # StableLM: the calibration tests' shared tiny checkpoint and export (same family, 2 layers)
    loaded, fp32 = (tiny_loaded, fp32_exports["ort"]) if family == "stablelm" else tiny_fp32_export(family, tmp_path)
    quantize_export(fp32, tmp_path / "int8", "int8")
    images = sample_images(loaded, 4)
    agreement, answers = greedy_agreement(loaded, tmp_path / "int8", images, 12)
    cosine, divergences = logit_cosine(loaded, tmp_path / "int8", images, answers)
    assert cosine["positions"] >= 24 and cosine["mean"] >= MIN_COSINE, cosine
    assert all(d["reference_margin"] < CONFIDENT_LOGITS for d in divergences), (agreement, divergences)
    # tokens before an answer's first divergence are also right teacher-forced, so the per-position figure
    # can only be higher than the free-running one
    assert cosine["argmax_agreement"] >= agreement, (cosine, agreement)


def test_reference_logits_kept_from_the_greedy_pass_equal_a_forced_pass(tmp_path, tiny_loaded, fp32_exports):
    """validate_quantized reuses PyTorch's greedy-pass logits as its teacher-forced logits (one PyTorch pass):
    the figures must be those of a separate forced pass."""
    images = sample_images(tiny_loaded, 3)
    _, kept = greedy_agreement(tiny_loaded, fp32_exports["ort"], images, 6, keep_reference_logits=True)
    _, plain = greedy_agreement(tiny_loaded, fp32_exports["ort"], images, 6)
    assert all(a["reference_logits"].shape[0] == len(a["pytorch"]) for a in kept)
    reused, _ = logit_cosine(tiny_loaded, fp32_exports["ort"], images, kept)
    forced, _ = logit_cosine(tiny_loaded, fp32_exports["ort"], images, plain)
    assert all("reference_logits" not in a for a in kept)             # nothing left for validation.json
    assert reused["positions"] == forced["positions"]
    assert abs(reused["mean"] - forced["mean"]) < 1e-6 and abs(reused["min"] - forced["min"]) < 1e-6
