"""Generation with the KV cache equals greedy decoding by full recomputation, token for token."""
import numpy as np
import pytest
import torch
from PIL import Image

from moe_llava.torch_engine import TorchEngine
from moe_llava.image_processing import HFImageProcessor
from runtime.generation import Pipeline
from runtime.prompt import IMAGE_TOKEN_INDEX, Template
from tiny import TINY_CLIP_PROCESSOR, tiny_model, tiny_tokenizer


def recompute_greedy(model, ids: list[int], pixels: torch.Tensor, steps: int, eos: int) -> list[int]:
    """No cache: run the whole sequence through model.forward for every new token."""
    out: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids + out]), pixels).logits[0, -1]
            token = int(logits.argmax())
            if token == eos:
                break
            out.append(token)
    return out


@pytest.mark.parametrize("family", ["stablelm", "phi"])
def test_cached_generation_equals_recomputation(family, tmp_path):
    model = tiny_model(family, seed=3)
    tokenizer = tiny_tokenizer(tmp_path)
    processor = HFImageProcessor(TINY_CLIP_PROCESSOR)
    pipe = Pipeline(TorchEngine(model), tokenizer, Template.STABLELM, processor.spec, eos_token_id=0,
                    preprocess=processor)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8))
    result = pipe.generate(image, "Describe the picture.", max_new_tokens=10)
    ids = pipe.prompt_ids("Describe the picture.", with_image=True)
    assert ids.count(IMAGE_TOKEN_INDEX) == 1
    pixels = torch.from_numpy(processor(image))[None]
    assert result.token_ids == recompute_greedy(model, ids, pixels, 10, eos=0)
    assert len(result.token_ids) > 3


def test_sampling_is_seeded_and_differs_from_greedy(tmp_path):
    model = tiny_model("stablelm", seed=4)
    processor = HFImageProcessor(TINY_CLIP_PROCESSOR)
    pipe = Pipeline(TorchEngine(model), tiny_tokenizer(tmp_path), Template.STABLELM, processor.spec, 0,
                    preprocess=processor)
    image = Image.new("RGB", (40, 28), (10, 200, 30))
    first = pipe.generate(image, "Hi", 12, temperature=1.5, top_p=0.95, seed=7).token_ids
    again = pipe.generate(image, "Hi", 12, temperature=1.5, top_p=0.95, seed=7).token_ids
    greedy = pipe.generate(image, "Hi", 12).token_ids
    assert first == again and first != greedy


def test_torch_engine_keep_then_extend_equals_a_fresh_prefill():
    engine = TorchEngine(tiny_model("stablelm", seed=5))
    embeds = engine.embed_tokens(np.array([3, 9, 4, 12, 7, 2], np.int64))   # [6,H]
    engine.prefill(embeds[:5])
    engine.decode(11)
    engine.keep(3)
    assert engine.cache_length == 3
    reused = engine.extend(embeds[[3, 5]])
    fresh = TorchEngine(engine.model).prefill(embeds[[0, 1, 2, 3, 5]])
    np.testing.assert_allclose(reused, fresh, rtol=1e-4, atol=1e-5)
