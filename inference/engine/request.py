"""A generation request as the engine sees it, and the events it sends back.

The API layer builds a GenerationRequest, the engine thread fills in its tokens, text and
timestamps, and events go back to the API layer through ``emit`` (which must be thread-safe).
Timestamps are ``time.perf_counter_ns()`` integers: cheap to take in the hot path, turned into
wall-clock times only when the request is recorded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

# perf_counter_ns() + this = nanoseconds since the epoch (for spans and log lines).
EPOCH_OFFSET_NS = time.time_ns() - time.perf_counter_ns()


def to_epoch_ns(perf_ns: int) -> int:
    return perf_ns + EPOCH_OFFSET_NS


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    @property
    def penalized(self) -> bool:
        return self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


class EngineError(Exception):
    """A request that the engine ends without a result; carries its HTTP status and error type."""

    def __init__(self, status: int, error_type: str, message: str, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message
        self.code = code


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # "stop" or "length"


@dataclass(frozen=True)
class Failed:
    error: EngineError


Event = TextDelta | Finished | Failed


@dataclass(eq=False)
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    deadline_ns: int  # perf_counter_ns() after which the request has timed out
    emit: Callable[[Event], None] = lambda event: None
    arrival_ns: int = field(default_factory=time.perf_counter_ns)
    trace_id: str = ""  # for the watchdog's stall report and the engine's log lines

    # Set by the API layer, read by the engine between steps.
    cancelled: bool = False

    # Filled in by the engine thread.
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stop_string_matched: bool = False
    error: EngineError | None = None
    scheduled_ns: int | None = None  # left the queue
    prefill_start_ns: int | None = None
    first_token_ns: int | None = None
    last_token_ns: int | None = None  # the last token kept in output_ids (EOS is not kept)
    finished_ns: int | None = None
    batch_size_at_prefill: int = 0

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.output_ids)

    @property
    def needs_incremental_text(self) -> bool:
        return self.stream or bool(self.params.stop)
