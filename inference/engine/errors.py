"""The errors a request can end with, other than a failed step: each an ``EngineError`` with its
HTTP status, OpenAI error type, code and a message that says what to do.

Without torch, like ``request``: the API layer builds the timeout error itself when it stops
waiting, and the watchdog the stall error.
"""

from __future__ import annotations

from typing import Any

from .memory import KvCacheShape
from .request import EngineError, GenerationRequest


def timeout_error(request: GenerationRequest) -> EngineError:
    timeout_s = (request.deadline_ns - request.arrival_ns) / 1e9
    where = (
        "in the queue"
        if request.scheduled_ns is None
        else (f"after {request.completion_tokens} generated tokens")
    )
    return EngineError(
        504,
        "timeout",
        f"the request's deadline of {timeout_s:g} s passed {where}; "
        "try a smaller max_tokens or retry later",
        code="deadline_exceeded",
    )


def shutdown_error() -> EngineError:
    return EngineError(
        503, "server_unavailable", "the server is shutting down; retry", code="shutting_down"
    )


def engine_dead_error(exc: BaseException) -> EngineError:
    return EngineError(
        500,
        "server_error",
        f"the engine thread died: {type(exc).__name__}: {exc}",
        code="engine_dead",
    )


def step_failed_error(stage: str, exc: BaseException) -> EngineError:
    return EngineError(
        500,
        "server_error",
        f"generation failed in {stage}: {type(exc).__name__}: {exc}",
        code="generation_failed",
    )


def out_of_memory_error(stage: str, exc: BaseException, figures: str) -> EngineError:
    what = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return EngineError(
        503,
        "server_unavailable",
        f"out of memory during {stage} ({what})"
        + (f"; {figures}" if figures else "")
        + "; retry later, or send a shorter prompt or a smaller max_tokens",
        code="out_of_memory",
    )


def insufficient_memory_error(
    request: GenerationRequest, kv: KvCacheShape, need: int, available: int, device: Any
) -> EngineError:
    tokens = request.prompt_tokens + request.params.max_tokens
    return EngineError(
        503,
        "server_unavailable",
        f"not enough GPU memory for this request: its KV cache needs an estimated "
        f"{need / 2**20:.1f} MiB ({tokens} tokens of prompt plus max_tokens x "
        f"{kv.bytes_per_token} bytes per token), and {available / 2**20:.1f} MiB are free on "
        f"{device}; send a shorter prompt or a smaller max_tokens",
        code="insufficient_memory",
    )


def stalled_error(stage: str, seconds: float, threshold: float) -> EngineError:
    return EngineError(
        503,
        "server_unavailable",
        f"the engine stalled in {stage}: no progress for {seconds:.1f} s (the "
        f"stall threshold is {threshold:g} s); the request was abandoned, retry "
        "later",
        code="engine_stalled",
    )
