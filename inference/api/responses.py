"""OpenAI response bodies and server-sent event chunks."""

from __future__ import annotations

import json
import time
from typing import Any

from ..engine.request import GenerationRequest


def usage(gen: GenerationRequest) -> dict[str, int]:
    return {
        "prompt_tokens": gen.prompt_tokens,
        "completion_tokens": gen.completion_tokens,
        "total_tokens": gen.prompt_tokens + gen.completion_tokens,
    }


def completion_body(
    endpoint: str, request_id: str, model: str, created: int, gen: GenerationRequest
) -> dict[str, Any]:
    if endpoint == "chat":
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": gen.text, "refusal": None},
            "logprobs": None,
            "finish_reason": gen.finish_reason,
        }
        kind = "chat.completion"
    else:
        choice = {
            "index": 0,
            "text": gen.text,
            "logprobs": None,
            "finish_reason": gen.finish_reason,
        }
        kind = "text_completion"
    return {
        "id": request_id,
        "object": kind,
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": usage(gen),
    }


class ChunkWriter:
    """Builds the ``data: ...`` lines of one streamed response."""

    def __init__(self, endpoint: str, request_id: str, model: str, include_usage: bool):
        self.endpoint = endpoint
        self.request_id = request_id
        self.model = model
        self.created = int(time.time())
        self.include_usage = include_usage

    def _event(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        kind = "chat.completion.chunk" if self.endpoint == "chat" else "text_completion"
        body: dict[str, Any] = {
            "id": self.request_id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            body["usage"] = None
        body.update(extra)
        return b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"

    def _choice(
        self, text: str | None, finish_reason: str | None, role: bool = False
    ) -> dict[str, Any]:
        if self.endpoint == "chat":
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}

    def start(self) -> bytes | None:
        """Chat streams open with the assistant role, as OpenAI's do."""
        if self.endpoint == "chat":
            return self._event([self._choice("", None, role=True)])
        return None

    def delta(self, text: str) -> bytes:
        return self._event([self._choice(text, None)])

    def finish(self, gen: GenerationRequest) -> bytes:
        out = self._event(
            [self._choice(None if self.endpoint == "chat" else "", gen.finish_reason)]
        )
        if self.include_usage:
            out += self._event([], usage=usage(gen))
        return out

    @staticmethod
    def error(body: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(body).encode() + b"\n\n"

    DONE = b"data: [DONE]\n\n"
