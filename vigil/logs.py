"""JSON-lines logging with loguru: one object per line on stdout, for Alloy and Loki.

Every line has timestamp, level, message, logger, request_id, trace_id and span_id (the last
three empty outside a request), plus any fields bound to the record. Standard-library logging
(uvicorn, urllib3, transformers) is routed through the same sink. A process that traces (the
inference process) passes a ``patcher`` that adds the current span's ids; this module itself
imports no OpenTelemetry.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from collections.abc import Callable
from typing import Any, TextIO

from loguru import logger

STANDARD_FIELDS = ("request_id", "trace_id", "span_id")


def format_record(record: dict[str, Any]) -> str:
    extra = record["extra"]
    line: dict[str, Any] = {
        "timestamp": record["time"].isoformat(),
        "level": record["level"].name,
        "message": record["message"],
        "logger": record["name"],
    }
    for name in STANDARD_FIELDS:
        line[name] = extra.get(name, "")
    for key, value in extra.items():
        if key not in line:
            line[key] = value
    if record["exception"] is not None:
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
        logger.patch(lambda r: r.update(name=record.name)).opt(exception=record.exc_info).log(
            level, record.getMessage()
        )


def setup_logging(
    level: str = "INFO",
    stream: TextIO | None = None,
    patcher: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    """JSON lines at ``level`` and above on ``stream`` (stdout), standard logging included."""
    logger.remove()
    logger.configure(patcher=patcher)
    logger.add(
        _JsonSink(stream or sys.stdout).write,
        level=level,
        format="{message}",
        backtrace=False,
        diagnose=False,
    )
    logging.basicConfig(handlers=[_InterceptHandler()], level=0, force=True)
    logging.captureWarnings(True)  # warnings.warn() lines become JSON lines too
