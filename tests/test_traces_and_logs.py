"""Spans (captured with the SDK's in-memory exporter) and JSON log lines with trace ids."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import openai
import pytest
import requests
import uvicorn
from conftest import chat_body
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from inference.api.app import build_app
from inference.config import Config
from inference.service import InferenceService
from inference.telemetry.recorder import RequestRecorder
from inference.telemetry.tracing import build_tracer_provider

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


@contextlib.contextmanager
def serve_traced(config: Config):
    """An in-process server for ``config`` whose spans land in memory: (its URL, the spans)."""
    exporter = InMemorySpanExporter()
    provider = build_tracer_provider(SimpleSpanProcessor(exporter))
    service = InferenceService(config)
    app = build_app(service, RequestRecorder(None, provider.get_tracer("test")))
    service.start()
    try:
        assert service.wait_loaded(120), service.load_error
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(app, log_config=None))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + 60
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.started
        try:
            yield f"http://127.0.0.1:{sock.getsockname()[1]}", exporter
        finally:
            server.should_exit = True
            thread.join(10)
    finally:
        service.stop()


@pytest.fixture(scope="module")
def traced(tmp_path_factory, demo_dir):
    """An in-process server whose spans land in memory."""
    config = Config(demo_dir=demo_dir, state_dir=str(tmp_path_factory.mktemp("state")))
    with serve_traced(config) as served:
        yield served


def test_request_span_with_children_and_genai_attributes(traced):
    base, exporter = traced
    exporter.clear()
    response = requests.post(
        base + "/v1/chat/completions",
        json=chat_body(max_tokens=6),
        headers={"traceparent": TRACEPARENT},
        timeout=60,
    )
    assert response.status_code == 200
    spans = {span.name: span for span in exporter.get_finished_spans()}
    root = spans["chat demo"]
    assert format(root.context.trace_id, "032x") == TRACE_ID  # the client's trace continues
    assert format(root.parent.span_id, "016x") == PARENT_ID
    assert response.headers["x-trace-id"] == TRACE_ID
    attributes = root.attributes
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.request.model"] == "demo"
    assert attributes["gen_ai.request.max_tokens"] == 6
    assert attributes["gen_ai.usage.output_tokens"] == 6
    assert attributes["gen_ai.usage.input_tokens"] == response.json()["usage"]["prompt_tokens"]
    assert tuple(attributes["gen_ai.response.finish_reasons"]) == ("length",)
    assert attributes["gen_ai.response.id"] == response.json()["id"]
    for name in ("queue wait", "prefill", "decode"):
        child = spans[name]
        assert child.parent.span_id == root.context.span_id
        assert root.start_time <= child.start_time <= child.end_time <= root.end_time
    assert spans["queue wait"].end_time <= spans["prefill"].start_time
    assert spans["prefill"].end_time <= spans["decode"].start_time


def test_failed_request_span_has_error_status(traced):
    base, exporter = traced
    exporter.clear()
    response = requests.post(
        base + "/v1/completions",
        json={"model": "demo", "prompt": "x", "max_tokens": -1},
        timeout=60,
    )
    assert response.status_code == 400
    (span,) = exporter.get_finished_spans()
    assert span.name == "text_completion demo"
    assert span.status.status_code.name == "ERROR"
    assert span.attributes["error.type"] == "invalid_request_error"
    assert span.attributes["http.response.status_code"] == 400


def test_streamed_request_is_traced(traced):
    base, exporter = traced
    exporter.clear()
    client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
    list(client.completions.create(model="demo", prompt="s", max_tokens=3, stream=True))
    # The client has [DONE] a moment before the server's stream closes and its span ends.
    deadline = time.monotonic() + 10
    while len(exporter.get_finished_spans()) < 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    names = sorted(span.name for span in exporter.get_finished_spans())
    assert names == ["decode", "prefill", "queue wait", "text_completion demo"]


def test_log_lines_are_json_and_carry_the_trace_id(server):
    response = requests.post(
        server.url("/v1/chat/completions"),
        json=chat_body("a secret prompt", max_tokens=4),
        headers={"traceparent": TRACEPARENT, "X-Request-Id": "log-test-1"},
        timeout=60,
    )
    assert response.status_code == 200
    lines = server.logs()  # fails if any line is not JSON
    for line in lines:
        assert {"timestamp", "level", "message", "request_id", "trace_id", "span_id"} <= set(line)
    (finished,) = [line for line in lines if line["request_id"] == "log-test-1"]
    assert finished["message"] == "request finished"
    # The field every request's last line has, whatever its outcome (the dashboards' filter).
    assert finished["event"] == "request_end" and finished["outcome"] == "finished"
    assert finished["trace_id"] == TRACE_ID
    assert len(finished["span_id"]) == 16
    assert finished["status"] == 200 and finished["finish_reason"] == "length"
    assert finished["completion_tokens"] == 4
    for timing in ("duration_s", "queue_s", "ttft_s"):
        assert finished[timing] >= 0
    # Prompts and outputs are private unless --log-prompts is given.
    assert "secret" not in server.log_path.read_text()


def test_log_prompts_flag(server_factory):
    server = server_factory("--log-prompts")
    requests.post(
        server.url("/v1/chat/completions"),
        json=chat_body("a visible prompt", max_tokens=4),
        headers={"X-Request-Id": "log-test-2"},
        timeout=60,
    )
    (finished,) = [line for line in server.logs() if line["request_id"] == "log-test-2"]
    assert "a visible prompt" in finished["prompt"]
    assert isinstance(finished["output"], str) and finished["output"]


def test_rejected_request_is_logged_as_a_warning(server):
    requests.post(
        server.url("/v1/chat/completions"),
        json=chat_body(max_tokens=0),
        headers={"X-Request-Id": "log-test-3"},
        timeout=60,
    )
    (line,) = [line for line in server.logs() if line["request_id"] == "log-test-3"]
    assert line["level"] == "WARNING"
    assert line["status"] == 400 and "max_tokens" in line["error"]
    assert line["event"] == "request_end" and line["outcome"] == "rejected"
    assert line["message"].startswith("request rejected: ")
