"""JSON-lines logging with loguru: one object per line on stdout, carrying trace context.

Every line has timestamp, level, message, logger, request_id, trace_id and span_id (the last
three empty outside a request), plus any fields bound to the record. The trace and span ids come
from the current OpenTelemetry span, so a line logged while a request is being handled carries
that request's ids; the engine thread binds them explicitly. Standard-library logging (uvicorn,
transformers) is routed through the same sink.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, TextIO

from loguru import logger
from opentelemetry import trace

_STANDARD_FIELDS = ("request_id", "trace_id", "span_id")


def _add_trace_context(record: dict[str, Any]) -> None:
    extra = record["extra"]
    if "trace_id" not in extra:
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            extra["trace_id"] = format(context.trace_id, "032x")
            extra["span_id"] = format(context.span_id, "016x")


def format_record(record: dict[str, Any]) -> str:
    extra = record["extra"]
    line: dict[str, Any] = {
        "timestamp": record["time"].isoformat(),
        "level": record["level"].name,
        "message": record["message"],
        "logger": record["name"],
    }
    for name in _STANDARD_FIELDS:
        line[name] = extra.get(name, "")
    for key, value in extra.items():
        if key not in line:
            line[key] = value
    if record["exception"] is not None:
        import traceback

        exc = record["exception"]
        line["exception"] = "".join(traceback.format_exception(exc.type, exc.value, exc.traceback))
    return json.dumps(line, default=str, ensure_ascii=False)


class _JsonSink:
    def __init__(self, stream: TextIO):
        self._stream = stream

    def write(self, message) -> None:
        self._stream.write(format_record(message.record) + "\n")
        self._stream.flush()


class _InterceptHandler(logging.Handler):
    """Send standard-library log records to loguru, keeping their level and logger name."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.patch(lambda r: r.update(name=record.name)).opt(
            exception=record.exc_info).log(level, record.getMessage())


def setup_logging(level: str = "INFO", stream: TextIO | None = None) -> None:
    logger.remove()
    logger.configure(patcher=_add_trace_context)
    logger.add(_JsonSink(stream or sys.stdout).write, level=level, format="{message}",
               backtrace=False, diagnose=False)
    logging.basicConfig(handlers=[_InterceptHandler()], level=0, force=True)
    logging.captureWarnings(True)  # warnings.warn() lines become JSON lines too
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
