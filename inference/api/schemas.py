"""Request bodies of the OpenAI-compatible API, validated strictly.

Types are strict (a string is not a number, a float is not an integer), ranges are OpenAI's,
and parameters that would change the answer in ways this server does not implement (n > 1,
logprobs, tools, a JSON response format) are refused rather than silently ignored. Unknown
fields are ignored, as newer clients send fields older servers do not know.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOP_SEQUENCES = 4

# Lists stop at their first bad item: a list of millions of bad items would otherwise make
# pydantic build an error for each, which takes the CPU for seconds (the sizes of the lists
# themselves are bounded before validation, in the API).
Items = TypeVar("Items")
FailFastList = Annotated[list[Items], Field(fail_fast=True)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    role: str
    content: str | FailFastList[dict[str, Any]] | None = None
    name: str | None = None

    @field_validator("role")
    @classmethod
    def _known_role(cls, role: str) -> str:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
        return role


class StreamOptions(_Strict):
    include_usage: bool = False


class _GenerationParams(_Strict):
    model: str
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    min_tokens: Annotated[int, Field(ge=0)] = 0
    temperature: Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)] | None = None
    # 0 is greedy, as OpenAI's API takes it.
    top_p: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)] | None = None
    stop: str | FailFastList[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    ignore_eos: bool = False
    seed: int | None = None  # accepted; a server-wide --seed makes sampling reproducible
    user: str | None = None
    logit_bias: dict[str, Any] | None = None  # refused unless empty: not implemented

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, body: Any) -> Any:
        """OpenAI's API description marks most parameters nullable, and clients send null for
        "not set": a null is read as the parameter left out."""
        if isinstance(body, dict):
            return {key: value for key, value in body.items() if value is not None}
        return body

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, bias: dict[str, Any] | None) -> dict[str, Any] | None:
        if bias:
            raise ValueError("logit_bias is not supported")
        return bias

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _GenerationParams:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @field_validator("n")
    @classmethod
    def _single_choice(cls, n: int | None) -> int | None:
        if n is not None and n != 1:
            raise ValueError("only n=1 is supported")
        return n

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, stop: Any) -> Any:
        if isinstance(stop, list) and len(stop) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        return stop

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ChatCompletionRequest(_GenerationParams):
    messages: FailFastList[ChatMessage]
    logprobs: bool | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    @field_validator("tools", mode="before")
    @classmethod
    def _no_tools(cls, tools: Any) -> Any:
        if tools:  # before the list is copied: it may be long
            raise ValueError("tools (function calling) are not supported")
        return tools

    @field_validator("messages")
    @classmethod
    def _not_empty(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if not messages:
            raise ValueError("messages must hold at least one message")
        return messages

    @model_validator(mode="after")
    def _supported(self) -> ChatCompletionRequest:
        if self.logprobs:
            raise ValueError("logprobs are not supported")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise ValueError("only response_format {'type': 'text'} is supported")
        return self


class CompletionRequest(_GenerationParams):
    prompt: str | FailFastList[str] | FailFastList[int]
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _supported(self) -> CompletionRequest:
        if self.logprobs:
            raise ValueError("logprobs are not supported")
        if self.echo:
            raise ValueError("echo is not supported")
        if self.best_of not in (None, 1):
            raise ValueError("only best_of=1 is supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        if isinstance(self.prompt, list):
            if not self.prompt:
                raise ValueError("prompt must not be empty")
            if isinstance(self.prompt[0], str) and len(self.prompt) != 1:
                raise ValueError("only one prompt per request is supported")
        return self


class FaultRequest(_Strict):
    """``POST /debug/fault``: a fault for the engine's next batch (fault injection only)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    fault: Literal["hang", "slow", "oom", "empty", "crash"]
    # preprocess: in the worker thread that decodes a request's images and runs the processor
    # (hang and slow only); vision: in the vision tower.
    stage: Literal["preprocess", "vision", "prefill", "decode"] = "prefill"
    # hang: how long (null: until the process stops); slow: the delay added to each step.
    seconds: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    steps: Annotated[int, Field(ge=1, le=1_000_000)] = 1  # slow: how many steps are slowed

    @model_validator(mode="after")
    def _seconds_where_needed(self) -> FaultRequest:
        if self.fault == "slow" and self.seconds is None:
            raise ValueError("a slow fault needs 'seconds', the delay added to each step")
        if self.fault in ("oom", "empty", "crash") and self.seconds is not None:
            raise ValueError(f"'seconds' has no meaning for a {self.fault} fault")
        if self.stage == "preprocess" and self.fault not in ("hang", "slow"):
            raise ValueError("stage 'preprocess' takes a hang or a slow fault only")
        return self
