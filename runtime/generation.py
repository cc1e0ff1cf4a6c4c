"""The generation loop: conversation -> spliced embeddings -> prefill -> decode until the end token, a stop
string, max_new_tokens or the end of the context.

Shapes: P visual tokens, S prompt positions (text tokens + P), H hidden size, V vocabulary.
Backend-agnostic: drives any runtime.engine.Engine (ONNX Runtime, TensorRT, the PyTorch adapter). Engines that
keep their cache (runtime.engine.PrefixCaching) prefill only what a prompt does not share with the previous one.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from runtime.engine import ContextLimited, Engine, PrefixCaching
from runtime.errors import UserError
from runtime.prefix_cache import ImageDigests, PrefixCache, conversation_keys, memoised_encoder
from runtime.preprocess import ImageSpec, load_image
from runtime.preprocess import preprocess as preprocess_image
from runtime.prompt import (IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX, Template, Turn, build_conversation,
                            join_image_chunks)
from runtime.sampling import TokenHistory, penalise, sample_next
from runtime.settings import FinishReason, GenerationSettings
from runtime.stop_strings import StopMatcher

ImageInput = Image.Image | str | Path | bytes | None  # bytes: an encoded image file

REPLACEMENT_CHAR = "\ufffd"  # what a byte-level decoder yields for an incomplete UTF-8 sequence


@dataclass
class GenerationResult:
    """timings (wall clock, ms unless named otherwise): preprocess_ms (load + preprocess the image), vision_ms
    (encode_images), prefill_ms (embed prompt text + prefill), ttft_ms (start -> first token sampled),
    decode_ms (first token -> end), decode_tokens_per_s (decode steps / decode time), total_ms, prompt_tokens.
    """
    text: str  # the answer, cut before a stop string
    token_ids: list[int]  # generated ids, without the prompt and without the end token
    timings: dict[str, float] = field(default_factory=dict)
    prompt_tokens: int = 0  # prompt positions: text tokens + visual tokens
    finish_reason: FinishReason = FinishReason.STOP
    cached_tokens: int = 0  # prompt positions reused from the previous request's KV cache (not prefilled)


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
    """Image + conversation -> streamed answer, on any Engine."""

    def __init__(self, engine: Engine, tokenizer, template: Template, image_spec: ImageSpec,
                 eos_token_id: int, bos_token_id: int | None = None,
                 preprocess: Callable[[Image.Image], np.ndarray] | None = None, visual_tokens: int = 0):
        self.engine = engine
        self.tokenizer = tokenizer  # tokenizers.Tokenizer
        self.template = Template(template)
        self.image_spec = image_spec
        self.eos_token_id = eos_token_id
        self.bos_token_id = bos_token_id
        # PIL image -> [3,h,w]; the PyTorch path passes transformers' processor, the runtime uses ours
        self.preprocess = preprocess or (lambda image: preprocess_image(image, image_spec))
        self.max_len = engine.max_len if isinstance(engine, ContextLimited) else None
        self.reuses_prefix = isinstance(engine, PrefixCaching)
        self.last_result: GenerationResult | None = None
        # what the engine's KV cache holds; visual_tokens (P, 0 = unknown until the first image) lets a prompt
        # that cannot fit fail before its image is encoded
        self._cache = PrefixCache([], visual_tokens)
        # what every request resends: the text before the image (system prompt, "USER: "), and the image
        self._encode_before_image = memoised_encoder(tokenizer)
        self._image_digest = ImageDigests()

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def prompt_ids(self, prompt: str, with_image: bool) -> list[int]:
        """Templated single-turn prompt ids; the image slot is one IMAGE_TOKEN_INDEX."""
        return self.conversation_ids([Turn(prompt)], with_image)

    def conversation_ids(self, turns: list[Turn], with_image: bool) -> list[int]:
        """Templated conversation ids (the last turn unanswered); the image slot is one IMAGE_TOKEN_INDEX."""
        text = build_conversation(self.template, turns, with_image)
        # the last chunk holds the question being asked, new in every request: not worth remembering
        *before, last = text.split(IMAGE_PLACEHOLDER)
        chunks = [*map(self._encode_before_image, before), self.tokenizer.encode(last).ids]
        ids = join_image_chunks(chunks, self.bos_token_id)
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

    def stream(self, image: ImageInput, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
               top_p: float = 1.0, seed: int | None = 0, **controls) -> Iterator[str]:
        """Single turn. `controls`: the other GenerationSettings fields (top_k, stop, penalties)."""
        settings = GenerationSettings(max_new_tokens, temperature, top_p, seed=seed, **controls)
        return self.chat_stream([Turn(prompt)], image, settings)

    def generate(self, image: ImageInput, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = 0, **controls) -> GenerationResult:
        for _ in self.stream(image, prompt, max_new_tokens, temperature, top_p, seed, **controls):
            pass
        return self.last_result

    def chat(self, turns: list[Turn], image: ImageInput = None,
             settings: GenerationSettings = GenerationSettings()) -> GenerationResult:
        for _ in self.chat_stream(turns, image, settings):
            pass
        return self.last_result

    def chat_stream(self, turns: list[Turn], image: ImageInput = None,
                    settings: GenerationSettings = GenerationSettings()) -> Iterator[str]:
        """Yield the answer to the last turn in pieces; the full result is in self.last_result afterwards.

        Timings are wall clock, so decode_ms also holds the (normally negligible) time the consumer spends
        between pieces. prefill_ms includes embedding the prompt's text tokens. Closing the iterator early
        stops generation; the engine's cache stays usable for the next request.
        """
        settings.check()
        self.last_result = None
        clock = _Clock()
        ids = self.conversation_ids(turns, image is not None)
        self._check_prompt_fits(ids, image is not None)
        keys = conversation_keys(ids, None if image is None else self._image_digest(image))
        reused = self._cache.reusable(keys) if self.reuses_prefix else 0
        logits, prompt_positions, cached = self._prefill(ids, keys, reused, image, clock)
        history = TokenHistory(logits.size, ids) if settings.penalised else None  # only penalties read it
        yield from self._answer(logits, history, settings, clock, prompt_positions, cached)

    def _check_prompt_fits(self, ids: list[int], with_image: bool) -> None:
        """Before any work where the number of visual tokens is known (the export's, or the last image's)."""
        visual = (self._cache.visual_tokens if with_image else 0)
        needed = len(ids) - int(with_image) + visual
        if self.max_len is not None and needed > self.max_len:
            raise UserError(f"the prompt needs {'at least ' if with_image and not visual else ''}{needed} "
                            f"positions but the model's context holds {self.max_len}; shorten the prompt")

    def _prefill(self, ids: list[int], keys: list, reused: int, image: ImageInput, clock: _Clock):
        """-> (logits of the last prompt position, prompt positions, positions reused from the cache)."""
        new_ids = ids[reused:]
        pixel_values = self._pixels(image) if IMAGE_TOKEN_INDEX in new_ids else None
        clock.lap("preprocess_ms")
        visual = None if pixel_values is None else self.engine.encode_images(pixel_values)[0]  # [P,H]
        clock.lap("vision_ms")
        if visual is not None:
            self._cache.visual_tokens = visual.shape[0]
            self._check_prompt_fits(ids, True)
        cached = self._cache.positions(reused)
        embeds = self.prompt_embeds(new_ids, visual)
        self._cache.keys = []  # unknown until the engine call returns
        if reused:
            self.engine.keep(cached)
            logits = self.engine.extend(embeds)
        else:
            logits = self.engine.prefill(embeds)
        self._cache.keys = keys
        clock.lap("prefill_ms")
        return logits, cached + embeds.shape[0], cached

    def _answer(self, logits: np.ndarray, history: TokenHistory | None, settings: GenerationSettings, clock: _Clock,
                prompt_positions: int, cached: int) -> Iterator[str]:
        rng = np.random.default_rng(settings.seed) if settings.temperature > 0 else None  # greedy draws none
        detok, stops = IncrementalDetokenizer(self.tokenizer), StopMatcher(settings.stop)
        shown: list[str] = []
        finish, positions = FinishReason.LENGTH, prompt_positions
        token = self._sample(logits, history, settings, rng)
        clock.mark("ttft_ms")
        while True:
            if token == self.eos_token_id:
                finish = FinishReason.STOP
                break
            if history is not None:
                history.add(token)
            piece = stops.push(detok.push(token))
            if piece:
                shown.append(piece)
                yield piece
            if stops.stopped:
                finish = FinishReason.STOP
                break
            if len(detok.ids) >= settings.max_new_tokens or positions == self.max_len:
                break
            token = self._sample(self._decode(token), history, settings, rng)
            positions += 1
        tail = stops.push(detok.flush())
        tail += "" if stops.stopped else stops.flush()
        finish = FinishReason.STOP if stops.stopped else finish
        if tail:
            shown.append(tail)
            yield tail
        self.last_result = self._result("".join(shown), detok.ids, clock, positions - prompt_positions,
                                        prompt_positions, cached, finish)

    def _sample(self, logits: np.ndarray, history: TokenHistory | None, settings: GenerationSettings,
                rng: np.random.Generator | None) -> int:
        if history is not None:
            logits = penalise(logits, history, settings)
        return sample_next(logits, settings.temperature, settings.top_p, rng, settings.top_k)

    def _decode(self, token: int) -> np.ndarray:
        self._cache.keys.append(None)  # unknown until the engine call returns
        logits = self.engine.decode(token)
        self._cache.keys[-1] = token
        return logits

    def _pixels(self, image: ImageInput) -> np.ndarray | None:
        if image is None:
            return None
        if isinstance(image, (bytes, str, Path)):
            image = load_image(image)
        return self.preprocess(image)[None]  # [1,3,h,w]

    @staticmethod
    def _result(text: str, token_ids: list[int], clock: _Clock, decode_steps: int, prompt_tokens: int,
                cached: int, finish: FinishReason) -> GenerationResult:
        timings = clock.finish()
        timings["decode_tokens_per_s"] = (decode_steps / (timings["decode_ms"] / 1e3)
                                         if decode_steps and timings["decode_ms"] > 0 else 0.0)
        timings["prompt_tokens"] = prompt_tokens
        return GenerationResult(text, list(token_ids), timings, prompt_tokens, finish, cached)


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
