"""OpenAI messages -> the model's conversation: alternating user/assistant turns ending with a user turn,
at most one image, placed where its user message is (the model's template puts it first in that turn)."""
from __future__ import annotations

from runtime.errors import UserError
from runtime.prompt import IMAGE_PLACEHOLDER, Turn
from runtime.serve.images import ImagePolicy, read_image_url
from runtime.serve.protocol import ImagePart, Message, TextPart


def conversation(messages: list[Message], policy: ImagePolicy) -> tuple[list[Turn], bytes | None]:
    check_roles(messages)
    image: bytes | None = None
    questions: list[str] = []
    answers: list[str] = []
    for message in messages:
        text, urls = split_content(message)
        if IMAGE_PLACEHOLDER in text:
            raise UserError(f"message text may not contain {IMAGE_PLACEHOLDER!r}; send the image as an "
                            "image_url content part")
        if urls and message.role != "user":
            raise UserError("only user messages may carry an image")
        if urls and (image is not None or len(urls) > 1):
            raise UserError("the model takes one image per conversation; send at most one image_url part")
        if urls:
            image = read_image_url(urls[0], policy)
            text = f"{IMAGE_PLACEHOLDER}\n{text}"
        (questions if message.role == "user" else answers).append(text)
    turns = [Turn(q, a) for q, a in zip(questions, answers)] + [Turn(questions[-1])]
    return turns, image


def check_roles(messages: list[Message]) -> None:
    if any(m.role == "system" for m in messages):
        raise UserError("system messages are not supported: the model answers with the system prompt it was "
                        "trained with; put instructions in the user message")
    for i, message in enumerate(messages):
        want = "user" if i % 2 == 0 else "assistant"
        if message.role != want:
            raise UserError(f"messages[{i}] is a {message.role} message where a {want} message belongs: turns "
                            "alternate user, assistant, ..., user")
    if messages[-1].role != "user":
        raise UserError("the last message must be a user message (the one to answer)")


def split_content(message: Message) -> tuple[str, list[str]]:
    """(text of all text parts joined by newlines, image URLs)."""
    if isinstance(message.content, str):
        return message.content, []
    texts = [p.text for p in message.content if isinstance(p, TextPart)]
    urls = [p.image_url if isinstance(p.image_url, str) else p.image_url.url
            for p in message.content if isinstance(p, ImagePart)]
    return "\n".join(texts), urls
