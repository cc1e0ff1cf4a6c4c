"""The generation loop: prompt -> spliced embeddings -> prefill -> decode until EOS or max_new_tokens.

Shapes: P visual tokens, S prompt positions (text tokens + P), H hidden size, V vocabulary.
Backend-agnostic: drives any runtime.engine.Engine (ONNX Runtime, TensorRT, the PyTorch adapter).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from runtime.engine import Engine
from runtime.errors import UserError
from runtime.preprocess import ImageSpec, load_image
from runtime.preprocess import preprocess as preprocess_image
from runtime.prompt import IMAGE_TOKEN_INDEX, Template, build_prompt, tokenize_with_image
from runtime.sampling import check_sampling_args, sample_next

REPLACEMENT_CHAR = "\ufffd"  # what a byte-level decoder yields for an incomplete UTF-8 sequence


@dataclass
class GenerationResult:
    """timings (wall clock, ms unless named otherwise): preprocess_ms (load + preprocess the image), vision_ms
    (encode_images), prefill_ms (embed prompt text + prefill), ttft_ms (start -> first token sampled),
    decode_ms (first token -> end), decode_tokens_per_s (decode steps / decode time), total_ms, prompt_tokens.
    """
    text: str
    token_ids: list[int]  # generated ids, without the prompt and without the end token
    timings: dict[str, float] = field(default_factory=dict)
    prompt_tokens: int = 0  # positions fed to prefill: text tokens + visual tokens


class IncrementalDetokenizer:
    """Turns a growing id list into text pieces that never split a UTF-8 character.

    Decodes the whole generated list each step (O(n) per step; fine for a few hundred tokens) and emits the
    new suffix once the text no longer ends in U+FFFD, i.e. once a byte-level BPE character is complete.
    `text` is always the concatenation of the emitted pieces; it equals decode(ids) for every decoder whose
    output for a prefix of ids is a prefix of the full output (byte-level BPE, SentencePiece).
    """

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._decoded_len = 0  # length of the decoded text that has been emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        decoded = self._decode()
        return "" if decoded.endswith(REPLACEMENT_CHAR) else self._emit(decoded)

    def flush(self) -> str:
        """Whatever is left at the end, replacement characters of a truncated sequence included."""
        return self._emit(self._decode())

    def _decode(self) -> str:
        return self._tokenizer.decode(self.ids, skip_special_tokens=True)

    def _emit(self, decoded: str) -> str:
        piece = decoded[self._decoded_len:]
        self._decoded_len = max(self._decoded_len, len(decoded))
        self.text += piece
        return piece


class Pipeline:
    """Image + question -> streamed answer, on any Engine."""

    def __init__(self, engine: Engine, tokenizer, template: Template, image_spec: ImageSpec,
                 eos_token_id: int, bos_token_id: int | None = None,
                 preprocess: Callable[[Image.Image], np.ndarray] | None = None):
        self.engine = engine
        self.tokenizer = tokenizer  # tokenizers.Tokenizer
        self.template = Template(template)
        self.image_spec = image_spec
        self.eos_token_id = eos_token_id
        self.bos_token_id = bos_token_id
        # PIL image -> [3,h,w]; the PyTorch path passes transformers' processor, the runtime uses ours
        self.preprocess = preprocess or (lambda image: preprocess_image(image, image_spec))
        self.last_result: GenerationResult | None = None

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def prompt_ids(self, prompt: str, with_image: bool) -> list[int]:
        """Templated prompt ids; the image slot is one IMAGE_TOKEN_INDEX."""
        ids = tokenize_with_image(self.tokenizer, build_prompt(self.template, prompt, with_image),
                                  self.bos_token_id)
        slots, images = ids.count(IMAGE_TOKEN_INDEX), int(with_image)
        if slots != images:
            raise UserError(f"the prompt has {slots} '<image>' placeholder(s) for {images} image(s); "
                            "give one image and at most one '<image>' (or none and no '<image>')")
        return ids

    def prompt_embeds(self, ids: list[int], visual: np.ndarray | None) -> np.ndarray:
        """[S,H]: embeddings of the text tokens with the visual tokens [P,H] spliced in at the image slot."""
        text_ids = np.array([i for i in ids if i != IMAGE_TOKEN_INDEX], dtype=np.int64)
        hidden = self.engine.hidden_size
        text = self.engine.embed_tokens(text_ids) if text_ids.size else np.zeros((0, hidden), np.float32)
        if visual is None:
            return text
        slot = ids.index(IMAGE_TOKEN_INDEX)  # = number of text tokens before the image
        return np.concatenate([text[:slot], visual.astype(np.float32), text[slot:]], axis=0)

    def stream(self, image: Image.Image | str | Path | None, prompt: str, max_new_tokens: int = 64,
               temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> Iterator[str]:
        """Yield text pieces as they are decoded; the full result is in self.last_result afterwards.

        Timings are wall clock, so decode_ms also holds the (normally negligible) time the consumer spends
        between pieces. prefill_ms includes embedding the prompt's text tokens.
        """
        check_sampling_args(temperature, top_p)
        if max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.last_result = None
        clock = _Clock()
        pixel_values = self._pixels(image)
        clock.lap("preprocess_ms")
        visual = None if pixel_values is None else self.engine.encode_images(pixel_values)[0]  # [P,H]
        clock.lap("vision_ms")
        embeds = self.prompt_embeds(self.prompt_ids(prompt, pixel_values is not None), visual)
        logits = self.engine.prefill(embeds)
        clock.lap("prefill_ms")

        rng = np.random.default_rng(seed)
        detok = IncrementalDetokenizer(self.tokenizer)
        token = sample_next(logits, temperature, top_p, rng)
        clock.mark("ttft_ms")
        decode_steps = 0
        while token != self.eos_token_id:
            piece = detok.push(token)
            if piece:
                yield piece
            if len(detok.ids) >= max_new_tokens:
                break
            token = sample_next(self.engine.decode(token), temperature, top_p, rng)
            decode_steps += 1
        piece = detok.flush()
        if piece:
            yield piece
        self.last_result = self._result(detok, clock, decode_steps, len(embeds))

    def generate(self, image: Image.Image | str | Path | None, prompt: str, max_new_tokens: int = 64,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> GenerationResult:
        for _ in self.stream(image, prompt, max_new_tokens, temperature, top_p, seed):
            pass
        return self.last_result

    def _pixels(self, image: Image.Image | str | Path | None) -> np.ndarray | None:
        if image is None:
            return None
        if isinstance(image, (str, Path)):
            image = load_image(image)
        return self.preprocess(image)[None]  # [1,3,h,w]

    def _result(self, detok: IncrementalDetokenizer, clock: _Clock, decode_steps: int,
                prompt_tokens: int) -> GenerationResult:
        timings = clock.finish()
        timings["decode_tokens_per_s"] = (decode_steps / (timings["decode_ms"] / 1e3)
                                         if decode_steps and timings["decode_ms"] > 0 else 0.0)
        timings["prompt_tokens"] = prompt_tokens
        return GenerationResult(detok.text, list(detok.ids), timings, prompt_tokens)


class _Clock:
    """Phase timings in ms: lap() closes a phase, mark() records time since start; decode runs from ttft."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.timings: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = (now - self.last) * 1e3
        self.last = now

    def mark(self, name: str) -> None:
        self.last = time.perf_counter()
        self.timings[name] = (self.last - self.start) * 1e3

    def finish(self) -> dict[str, float]:
        self.lap("decode_ms")
        self.timings["total_ms"] = (self.last - self.start) * 1e3
        return self.timings
