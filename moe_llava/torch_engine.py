"""The PyTorch model behind the runtime's `Engine` protocol, so `moe-run --model` and
`moe-run --engine-dir` share one generation loop, one sampler and one prompt builder."""
from __future__ import annotations

import numpy as np
import torch
from transformers import DynamicCache

from .model import MoELlavaForCausalLM
from .upcast import compute_dtype


class TorchEngine:
    def __init__(self, model: MoELlavaForCausalLM, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.hidden_size = model.config.hidden_size
        self.dtype = compute_dtype(model.language_model)
        self.vision_dtype = compute_dtype(model.vision_tower)
        self.cache: DynamicCache | None = None

    @torch.inference_mode()
    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        pixels = torch.from_numpy(pixel_values).to(self.device, self.vision_dtype)
        return self.model.encode_images(pixels).float().cpu().numpy()                   # [N,P,H]

    @torch.inference_mode()
    def embed_tokens(self, token_ids: np.ndarray) -> np.ndarray:
        ids = torch.from_numpy(token_ids).to(self.device)
        return self.model.embed_tokens(ids).float().cpu().numpy()                         # [S,H]

    @torch.inference_mode()
    def prefill(self, inputs_embeds: np.ndarray) -> np.ndarray:
        self.cache = DynamicCache(config=self.model.language_model.config)
        return self._step(torch.from_numpy(inputs_embeds).to(self.device, self.dtype)[None])  # [1,S,H]

    @torch.inference_mode()
    def extend(self, inputs_embeds: np.ndarray) -> np.ndarray:
        return self._step(torch.from_numpy(inputs_embeds).to(self.device, self.dtype)[None])  # [1,S,H]

    def keep(self, positions: int) -> None:
        if not 0 <= positions <= self.cache_length:
            raise ValueError(f"cannot keep {positions} of {self.cache_length} cached positions")
        self.cache.crop(positions - self.cache_length)  # transformers 5: a negative count of positions to drop

    @property
    def cache_length(self) -> int:
        return 0 if self.cache is None else self.cache.get_seq_length()

    @property
    def max_len(self) -> int:
        return self.model.language_model.config.max_position_embeddings

    @torch.inference_mode()
    def decode(self, token_id: int) -> np.ndarray:
        embeds = self.model.embed_tokens(torch.tensor([[token_id]], device=self.device))  # [1,1,H]
        return self._step(embeds)

    def _step(self, embeds: torch.Tensor) -> np.ndarray:
        # the head on the last position only: [S,V] logits of a 656-position prefill are 263 MB at V=100352
        logits, self.cache = self.model.decode_embeds(embeds, past_key_values=self.cache, use_cache=True,
                                                      last_only=True)
        return logits[0, -1].float().cpu().numpy()                                        # [V]

    def close(self) -> None:
        self.cache = None
