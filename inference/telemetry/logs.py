"""The inference process's logging: vigil's JSON lines, with the current trace context.

The trace and span ids come from the current OpenTelemetry span, so a line logged while a
request is being handled carries that request's ids; the engine thread binds them explicitly.
uvicorn's and transformers' loggers are routed through the same sink.
"""

from __future__ import annotations

import logging
from typing import Any, TextIO

from opentelemetry import trace

from vigil import logs


def _add_trace_context(record: dict[str, Any]) -> None:
    extra = record["extra"]
    if "trace_id" not in extra:
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            extra["trace_id"] = format(context.trace_id, "032x")
            extra["span_id"] = format(context.span_id, "016x")


def setup_logging(level: str = "INFO", stream: TextIO | None = None) -> None:
    logs.setup_logging(level, stream, patcher=_add_trace_context)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "transformers"):
        std = logging.getLogger(name)
        std.handlers = []
        std.propagate = True
    # uvicorn's access log duplicates our one line per request, without its outcome.
    logging.getLogger("uvicorn.access").disabled = True
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        # transformers writes through its own stderr handler unless told to propagate.
        hf_logging.disable_default_handler()
        hf_logging.enable_propagation()
    except ImportError:  # transformers is only needed once a model loads
        pass
