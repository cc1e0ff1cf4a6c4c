"""The PyTorch path of `moe-run --model`: a runtime Pipeline driven by the PyTorch model."""
from __future__ import annotations

import torch

from runtime.generation import Pipeline

from .loading import LoadedModel, load_pretrained
from .torch_engine import TorchEngine


def pipeline_for(loaded: LoadedModel, device: str | torch.device = "cpu") -> Pipeline:
    """The runtime's generation loop over the PyTorch model, with the reference processor (transformers),
    not the runtime's numpy port: the reference side of every parity check."""
    return Pipeline(TorchEngine(loaded.model, device), loaded.tokenizer, loaded.template, loaded.image_processor.spec,
                    loaded.eos_token_id, loaded.bos_token_id, preprocess=loaded.image_processor)


def torch_pipeline(model: str, vision_tower: str | None = None, device: str = "cpu",
                   dtype: str | torch.dtype = "auto") -> Pipeline:
    """`dtype` (auto | fp32 | bf16 | fp16, or a torch dtype) casts everything but the routers (fp32, as
    trained); `device` is a torch device ("cpu", "cuda")."""
    return pipeline_for(load_pretrained(model, vision_tower, dtype=dtype), device)
