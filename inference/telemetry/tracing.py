"""OpenTelemetry tracing: one span per request, children for queue wait, prefill and decode.

Export is over OTLP/HTTP, and only when an endpoint is configured through the standard
variables (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT); otherwise spans
are still made, so that log lines carry trace ids and a client's ``traceparent`` is honoured,
but nothing leaves the process. OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES name the service;
OTEL_SDK_DISABLED=true turns tracing off.
"""

from __future__ import annotations

import os

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from .otlp import otlp_endpoint

DEFAULT_SERVICE_NAME = "vigil-inference"


def build_tracer_provider(extra_processor: SpanProcessor | None = None) -> trace.TracerProvider:
    """A provider for this process; ``extra_processor`` lets tests capture spans in memory."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return trace.NoOpTracerProvider()
    attributes = {}
    if "OTEL_SERVICE_NAME" not in os.environ:
        attributes["service.name"] = DEFAULT_SERVICE_NAME
    provider = TracerProvider(resource=Resource.create(attributes))
    if otlp_endpoint() is not None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    if extra_processor is not None:
        provider.add_span_processor(extra_processor)
    return provider
