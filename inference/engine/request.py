"""A generation request as the engine sees it, and the events it sends back.

The API layer builds a GenerationRequest, the engine thread fills in its tokens, text and
timestamps, and events go back to the API layer through ``emit`` (which must be thread-safe).
A request ends once, through ``finish``, ``fail`` or ``end_cancelled``: the engine, the watchdog
and the API's cancel may race to end it, and the first to do so wins (the others are no-ops).
Timestamps are ``time.perf_counter_ns()`` integers: cheap to take in the hot path, turned into
wall-clock times only when the request is recorded.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

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
    vision: Any = None  # VisionInputs for a request with images (inference/vision/inputs.py)

    # Set by ``cancel`` (the API layer, the watchdog), read by the engine between steps.
    cancelled: bool = False

    # Filled in by the engine thread; the outcome (text, finish_reason or error, finished_ns) is
    # written once, by the first end.
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stop_string_matched: bool = False
    error: EngineError | None = None
    scheduled_ns: int | None = None  # left the queue
    first_token_ns: int | None = None
    last_token_ns: int | None = None  # the last token kept in output_ids (EOS is not kept)
    finished_ns: int | None = None
    batch_size_at_prefill: int = 0
    vision_started_ns: int | None = None  # the vision encoder ran on this request's images
    vision_finished_ns: int | None = None

    _end_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @property
    def queued_ns(self) -> int:
        """When it was put on the queue: after its images were preprocessed (downloads
        included, which have their own deadline), else on arrival."""
        vision = self.vision
        return vision.preprocess_finished_ns if vision is not None else self.arrival_ns

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.output_ids)

    @property
    def needs_incremental_text(self) -> bool:
        return self.stream or bool(self.params.stop)

    @property
    def ended(self) -> bool:
        return self.finished_ns is not None

    def cancel(self) -> None:
        """Nobody will read the answer: the engine drops the request at its next step (safe from
        any thread; it does not end the request, which the queue or the engine still holds)."""
        self.cancelled = True

    def finish(self, reason: str, text: str) -> bool:
        """End with a result (``reason`` is "stop" or "length") and send ``Finished``; False, and
        nothing changed, if the request had already ended."""
        if not self._end(reason, text):
            return False
        self.emit(Finished(reason))
        return True

    def fail(self, error: EngineError) -> bool:
        """End with ``error`` and send ``Failed``; False, and nothing changed, if the request had
        already ended. Safe from any thread: the first end wins."""
        if not self._end(error=error):
            return False
        self.emit(Failed(error))
        return True

    def end_cancelled(self) -> bool:
        """End a cancelled request: no event, as nobody listens; False if it had already ended."""
        return self._end()

    def _end(
        self, reason: str | None = None, text: str = "", error: EngineError | None = None
    ) -> bool:
        with self._end_lock:
            if self.finished_ns is not None:
                return False
            self.finish_reason, self.text, self.error = reason, text, error
            self.finished_ns = time.perf_counter_ns()
            return True
