"""Chat message content: text and image parts, read from an OpenAI request into the messages a
chat template takes, with the image URLs in prompt order (nothing decoded here).

OpenAI's shape: ``content`` is a string or a list of parts, ``{"type": "text", "text": ...}`` or
``{"type": "image_url", "image_url": {"url": ..., "detail": "auto"|"low"|"high"}}``. Templates of
vision-language models take ``{"type": "image"}`` placeholders where the images go.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DETAILS = ("auto", "low", "high")


class ContentError(ValueError):
    """A message part that cannot be read; ``param`` names it (``messages[1].content[0]``)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(frozen=True)
class ImagePart:
    url: str
    detail: str  # accepted as OpenAI defines it; the processor's max_pixels sets the resolution
    param: str  # where it was, for errors


@dataclass
class ChatContent:
    messages: list[dict[str, Any]] = field(default_factory=list)  # for the chat template
    images: list[ImagePart] = field(default_factory=list)  # in prompt order

    @property
    def has_images(self) -> bool:
        return bool(self.images)


def _shown(value: Any, limit: int = 40) -> str:
    """A client's value in an error message, cut short (it is echoed and logged)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _image_part(part: dict[str, Any], param: str) -> ImagePart:
    spec = part.get("image_url")
    if isinstance(spec, str):  # some clients send the URL itself
        spec = {"url": spec}
    if not isinstance(spec, dict):
        raise ContentError(
            "an image_url part needs 'image_url': {'url': ...}", f"{param}.image_url"
        )
    url = spec.get("url")
    if not isinstance(url, str) or not url:
        raise ContentError("an image_url part needs a string 'url'", f"{param}.image_url.url")
    detail = spec.get("detail", "auto")
    if detail not in DETAILS:
        raise ContentError(
            f"'detail' must be one of {', '.join(DETAILS)}, got {_shown(detail)}",
            f"{param}.image_url.detail",
        )
    return ImagePart(url, detail, param)


def read_messages(messages: list[Any], model: str, accepts_images: bool) -> ChatContent:
    """The template's messages and the images, in order; a ContentError for a bad part, and
    for an image sent to a model that reads text only."""
    content = ChatContent()
    for index, message in enumerate(messages):
        param = f"messages[{index}].content"
        raw = message.content
        if raw is None:
            raise ContentError("content is required", param)
        if isinstance(raw, str):
            content.messages.append({"role": message.role, "content": raw})
            continue
        parts: list[dict[str, Any]] = []
        for number, part in enumerate(raw):
            where = f"{param}[{number}]"
            kind = part.get("type")
            if kind == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise ContentError("a text part needs a string 'text'", f"{where}.text")
                parts.append({"type": "text", "text": text})
            elif kind == "image_url":
                if not accepts_images:
                    raise ContentError(
                        f"the model {model!r} is text-only: it cannot read image parts; send "
                        "text parts, or serve a vision-language model",
                        where,
                    )
                if message.role != "user":
                    raise ContentError(
                        f"image parts are only allowed in user messages, not {message.role!r}",
                        where,
                    )
                content.images.append(_image_part(part, where))
                parts.append({"type": "image"})
            else:
                raise ContentError(
                    f"content parts of type {_shown(kind)} are not supported; send 'text'"
                    + (" or 'image_url'" if accepts_images else "")
                    + " parts",
                    where,
                )
        if accepts_images:
            content.messages.append({"role": message.role, "content": parts})
        else:  # text-only templates expect a string
            content.messages.append(
                {"role": message.role, "content": "".join(p["text"] for p in parts)}
            )
    return content
