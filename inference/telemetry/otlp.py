"""Where traces are exported, read from the standard OpenTelemetry variables alone: the server
and the doctor share it, and the doctor runs where OpenTelemetry is not installed."""

from __future__ import annotations

import os
from collections.abc import Mapping

_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def otlp_endpoint(environ: Mapping[str, str] | None = None) -> str | None:
    """The OTLP/HTTP endpoint traces go to; None when none is set or OTEL_TRACES_EXPORTER=none."""
    environ = os.environ if environ is None else environ
    if environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return None
    for name in _ENDPOINT_VARIABLES:
        if environ.get(name, "").strip():
            return environ[name].strip()
    return None
