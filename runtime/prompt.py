"""Chat templates and prompt tokenisation, shared by training, the PyTorch path and the runtime.

Torch-free on purpose: the runtime on a Jetson builds prompts with exactly this code.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Sequence

IMAGE_PLACEHOLDER = "<image>"
IMAGE_TOKEN_INDEX = -200  # id the reference code uses for the image slot inside input_ids
IGNORE_INDEX = -100

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
END_OF_TEXT = "<|endoftext|>"


class Template(str, Enum):
    STABLELM = "stablelm"
    PHI = "phi"
    QWEN = "qwen"
    PLAIN = "plain"  # stage I: "<image>" + caption + "\n"


TEMPLATE_BY_MODEL_TYPE = {
    "moe_llava_stablelm": Template.STABLELM,
    "moe_llava_phi": Template.PHI,
    "moe_llava_qwen": Template.QWEN,
    # the dense -Stage2 checkpoints carry the reference's LLaVA model types
    "llava_stablelm": Template.STABLELM,
    "llava_phi": Template.PHI,
    "llava_qwen": Template.QWEN,
}


@dataclass(frozen=True)
class Turn:
    question: str
    answer: str | None = None  # None for the turn the model is asked to complete


def template_for(model_type: str) -> Template:
    try:
        return TEMPLATE_BY_MODEL_TYPE[model_type]
    except KeyError:
        raise ValueError(f"no chat template for model_type {model_type!r}; "
                         f"expected one of {sorted(TEMPLATE_BY_MODEL_TYPE)}") from None


def render_segments(template: Template, turns: list[Turn]) -> list[tuple[str, bool]]:
    """The conversation as (text, is_answer) segments; answers are what the LM loss covers.

    stablelm/phi/qwen (the reference's "two separators" style):
      "{SYSTEM} USER: {q1} ASSISTANT: {a1}<|endoftext|>USER: {q2} ASSISTANT:"
    plain: "{q}{a}\n" with q normally just "<image>".
    """
    template = Template(template)
    if template is Template.PLAIN:
        segments = []
        for turn in turns:
            segments.append((turn.question, False))
            if turn.answer is not None:
                segments.append((turn.answer + "\n", True))
        return segments
    segments = [(SYSTEM + " ", False)]
    for turn in turns:
        segments.append((f"USER: {turn.question} ASSISTANT:", False))
        if turn.answer is not None:
            # The space belongs to the answer so that training sees the same tokens the model
            # emits after "ASSISTANT:" at inference (BPE merges the leading space into the word).
            segments.append((" " + turn.answer + END_OF_TEXT, True))
    return segments


def build_prompt(template: Template, question: str, with_image: bool = True) -> str:
    """Single-turn generation prompt; the image goes first, as the reference CLI puts it."""
    return build_conversation(template, [Turn(question)], with_image)


def build_conversation(template: Template, turns: list[Turn], with_image: bool = True) -> str:
    """Generation prompt of a conversation whose last turn is unanswered (the reference's multi-turn format:
    "... USER: {q1} ASSISTANT: {a1}<|endoftext|>USER: {q2} ASSISTANT:"). Without an "<image>" in any
    question, the image goes first in the first one, as the reference CLI puts it. An answer's leading space
    is the template's (the model emits it as part of its first token), so answers are passed without it."""
    if not turns or turns[-1].answer is not None:
        raise ValueError("a generation prompt ends with an unanswered turn")
    turns = [Turn(t.question, None if t.answer is None else t.answer.lstrip(" ")) for t in turns]
    if with_image and not any(IMAGE_PLACEHOLDER in turn.question for turn in turns):
        sep = "" if Template(template) is Template.PLAIN else "\n"
        turns = [Turn(IMAGE_PLACEHOLDER + sep + turns[0].question, turns[0].answer), *turns[1:]]
    return "".join(text for text, _ in render_segments(template, turns))


def tokenize_with_image(tokenizer, text: str, bos_token_id: int | None = None) -> list[int]:
    """Token ids of `text`, each "<image>" replaced by one IMAGE_TOKEN_INDEX.

    Each chunk between placeholders is tokenised on its own (as the reference does); when the
    tokenizer prepends BOS, only the first chunk keeps it.
    `tokenizer` is a `tokenizers.Tokenizer` (encode(...).ids).
    """
    return join_image_chunks([tokenizer.encode(chunk).ids for chunk in text.split(IMAGE_PLACEHOLDER)],
                             bos_token_id)


def join_image_chunks(chunks: Sequence[Sequence[int]], bos_token_id: int | None = None) -> list[int]:
    """tokenize_with_image from the ids of each chunk of the text split at "<image>" (so that a caller may
    memoise the chunks' tokenisation)."""
    adds_bos = bos_token_id is not None and bool(chunks[0]) and chunks[0][0] == bos_token_id
    ids: list[int] = []
    for i, chunk in enumerate(chunks):
        if i > 0:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(chunk[1:] if adds_bos and i > 0 else chunk)
    return ids


def tokenize_conversation(tokenizer, template: Template, turns: list[Turn],
                          bos_token_id: int | None = None) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for training: labels are IGNORE_INDEX everywhere but on answers."""
    input_ids: list[int] = []
    labels: list[int] = []
    for text, is_answer in render_segments(template, turns):
        bos = bos_token_id if not input_ids else None
        ids = tokenize_with_image(tokenizer, text, bos)
        if input_ids and bos_token_id is not None and ids[:1] == [bos_token_id]:
            ids = ids[1:]
        input_ids.extend(ids)
        labels.extend(ids if is_answer else [IGNORE_INDEX] * len(ids))
    return input_ids, labels
