"""Weight-only int8 keeps PyTorch's greedy answers on a tiny checkpoint of each backbone (StableLM, Phi-2,
Qwen-1): plain greedy agreement >= 0.95 (issue 15's target), no calibration data involved."""
import pytest

from calibration.quantize import quantize_export
from export.validate import greedy_agreement, sample_images
from tiny import write_tiny_checkpoint

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("family", ["stablelm", "phi", "qwen"])
def test_int8_greedy_agreement(family, tmp_path):
    from export.moe_lowering import MoEImpl
    from export.onnx_export import Precision, write_export
    from moe_llava.loading import load_pretrained
    write_tiny_checkpoint(tmp_path / "ckpt", family, num_hidden_layers=2)
    loaded = load_pretrained(tmp_path / "ckpt")
    (tmp_path / "fp32").mkdir()
    write_export(loaded, tmp_path / "fp32", MoEImpl.ORT, Precision.FP32)
    quantize_export(tmp_path / "fp32", tmp_path / "int8", "int8")
    agreement, answers = greedy_agreement(loaded, tmp_path / "int8", sample_images(loaded, 4), 12)
    assert sum(len(a["pytorch"]) for a in answers) >= 24   # enough generated tokens to judge
    assert agreement >= 0.95, answers
