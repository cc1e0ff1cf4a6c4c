"""The PyTorch path of `moe-run --model`: a runtime Pipeline driven by the PyTorch model."""
from __future__ import annotations

from runtime.generation import Pipeline

from .engine import TorchEngine
from .loading import load_pretrained


def torch_pipeline(model: str, vision_tower: str | None = None, dtype: str = "auto") -> Pipeline:
    loaded = load_pretrained(model, vision_tower, dtype)
    # the reference processor (transformers), not the runtime's numpy port
    return Pipeline(TorchEngine(loaded.model), loaded.tokenizer, loaded.template, loaded.image_processor.spec,
                    loaded.eos_token_id, loaded.bos_token_id, preprocess=loaded.image_processor)
