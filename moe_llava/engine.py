"""The PyTorch model behind the runtime's `Engine` protocol, so `moe-run --model` and
`moe-run --engine-dir` share one generation loop, one sampler and one prompt builder."""
from __future__ import annotations

import numpy as np
import torch
from transformers import DynamicCache

from .model import MoELlavaForCausalLM


class TorchEngine:
    def __init__(self, model: MoELlavaForCausalLM):
        self.model = model.eval()
        self.hidden_size = model.config.hidden_size
        self.dtype = next(model.language_model.parameters()).dtype
        self.cache: DynamicCache | None = None

    @torch.inference_mode()
    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.model.encode_images(torch.from_numpy(pixel_values).to(self.dtype)).float().numpy()  # [N,P,H]

    @torch.inference_mode()
    def embed_tokens(self, token_ids: np.ndarray) -> np.ndarray:
        return self.model.embed_tokens(torch.from_numpy(token_ids)).float().numpy()       # [S,H]

    @torch.inference_mode()
    def prefill(self, inputs_embeds: np.ndarray) -> np.ndarray:
        self.cache = DynamicCache(config=self.model.language_model.config)
        return self._step(torch.from_numpy(inputs_embeds).to(self.dtype)[None])          # [1,S,H]

    @torch.inference_mode()
    def decode(self, token_id: int) -> np.ndarray:
        embeds = self.model.embed_tokens(torch.tensor([[token_id]]))                     # [1,1,H]
        return self._step(embeds)

    def _step(self, embeds: torch.Tensor) -> np.ndarray:
        lm = self.model.language_model
        out = lm.model(inputs_embeds=embeds, past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        # the head on the last position only: [S,V] logits of a 656-position prefill are 263 MB at V=100352
        return lm.lm_head(out.last_hidden_state[0, -1]).float().numpy()                  # [V]

    def close(self) -> None:
        self.cache = None
