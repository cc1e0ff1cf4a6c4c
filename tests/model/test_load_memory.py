"""Loading holds the weights once: peak resident memory of load_pretrained against the weights' bytes.

A ~140M-parameter checkpoint (fp16 on disk, written by the released-shape writer) is loaded in a fresh
subprocess; the growth of its peak RSS (VmHWM) over the RSS after imports is compared with the bytes of the
loaded parameters. The old path (fresh init + whole state dict + load_state_dict) needed ~2.5x. The bound,
1.05x plus 32 MB, leaves room for the largest tensor in flight and the model's Python objects (measured
1.04x / 1.09x at fp32 / bf16, 21-24 MB over), not for a second copy, nor for the freed read buffers that glibc
keeps in the heap unless moe_llava/heap.py hands them back (without it: 1.07-1.11x / 1.25-1.30x).
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_llava.random_checkpoint import write_random_checkpoint
from tiny import tiny_config, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]
PROBE = """
import sys
import accelerate, tokenizers, torch  # noqa: F401 - imported before the baseline is taken
import transformers.models.clip.modeling_clip, transformers.models.stablelm.modeling_stablelm  # noqa: F401
from moe_llava.loading import load_pretrained
from moe_llava.materialise import materialise  # noqa: F401

def status(field):
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1]) * 1024

base = status("VmRSS:")
model = load_pretrained(sys.argv[1], dtype=sys.argv[2]).model
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(base, status("VmHWM:"), weights)
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt110m")
    config = tiny_config("stablelm", hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                         num_attention_heads=12, num_key_value_heads=12, vocab_size=16000)
    write_random_checkpoint(directory, config, shard_bytes=64 << 20)
    tiny_tokenizer(directory)
    return directory


def peak_growth(directory: Path, dtype: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, str(directory), dtype], capture_output=True, text=True,
                         check=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
                                                    "PATH": "/usr/bin:/bin"})
    base, peak, weights = map(int, out.stdout.split()[-3:])
    return peak - base, weights


@pytest.mark.parametrize("dtype,itemsize", [("fp32", 4), ("bf16", 2)])
def test_peak_memory_is_the_weights_once(checkpoint, dtype, itemsize):
    growth, weights = peak_growth(checkpoint, dtype)
    on_disk = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors"))
    assert weights == pytest.approx(on_disk / 2 * itemsize, rel=0.01)  # fp16 files, every tensor loaded
    assert weights > 200e6
    assert growth <= 1.05 * weights + (32 << 20), f"peak grew by {growth / weights:.2f}x the weights ({(growth - weights) / 1e6:.0f} MB over)"


def test_loaded_weights_are_the_files_values(checkpoint):
    """Streaming did not reorder or mix tensors: spot-check against safetensors' own reader."""
    from safetensors import safe_open

    from moe_llava.loading import load_pretrained
    model = load_pretrained(checkpoint, dtype="fp32").model
    weight_map = json.loads((checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.6.mlp.deepspeed_moe.experts.deepspeed_experts.3.up_proj.weight"
    with safe_open(str(checkpoint / weight_map[name]), "pt") as f:
        want = f.get_tensor(name).float()
    layer = 6
    got = model.layers[layer].mlp.fc1_weight[3].chunk(2)[1]  # fc1 = [gate; up]
    assert torch.equal(got, want)
