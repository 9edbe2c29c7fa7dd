"""Batching, the bounded queue, deadlines and client disconnects, through real HTTP."""

from __future__ import annotations

import concurrent.futures
import json
import socket
import time

import httpx
import openai
import pytest
import requests
from conftest import chat_body

CHAT = "/v1/chat/completions"
# The demo model decodes a few hundred tokens per second here: this keeps a request busy for
# several seconds, long enough to watch it, short enough for the suite.
LONG = {"max_tokens": 1900, "ignore_eos": True}


def _long_completion(content: str = "long", **extra) -> dict:
    return {"model": "demo", "prompt": content, **LONG, **extra}


def _open_stream(server, body: dict) -> tuple[socket.socket, bytes]:
    """Send a streaming request on a raw socket; return it once the first chunk arrived."""
    host, port = server.base_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    payload = json.dumps({**body, "stream": True}).encode()
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload
    )
    received = b""
    while b"data: " not in received:
        received += sock.recv(65536)
    return sock, received


def test_concurrent_requests_are_batched(server_factory):
    server = server_factory()
    client = openai.OpenAI(base_url=server.url("/v1"), api_key="x", max_retries=0, timeout=120)

    def one(i: int) -> int:
        return client.completions.create(
            model="demo", prompt=f"request {i}", max_tokens=64, temperature=0
        ).usage.completion_tokens

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert list(pool.map(one, range(16))) == [64] * 16
    finished = [line for line in server.logs() if line["message"] == "request finished"]
    assert len(finished) == 16
    assert max(line["batch_size"] for line in finished) > 1, "no two requests shared a batch"
    assert server.sample("inference_prefill_batch_size_count") < 16


def test_batched_answers_equal_single_answers(server_factory):
    """Continuous batching (left padding, merged KV caches) must not change greedy outputs."""
    server = server_factory()
    client = openai.OpenAI(base_url=server.url("/v1"), api_key="x", max_retries=0, timeout=120)
    prompts = ["a", "a much longer prompt than the others", "mid-size prompt", "zz" * 20]

    def run(prompt: str) -> str:
        return (
            client.completions.create(model="demo", prompt=prompt, max_tokens=40, temperature=0)
            .choices[0]
            .text
        )

    alone = [run(p) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        together = list(pool.map(run, prompts * 3))
    assert together == alone * 3


def test_full_queue_answers_429_with_retry_after(server_factory):
    server = server_factory("--max-batch-size", "1", "--max-queue", "1")
    running, _ = _open_stream(server, _long_completion("first"))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        queued = pool.submit(
            requests.post,
            server.url("/v1/completions"),
            json=_long_completion("second", max_tokens=5),
            timeout=120,
        )
        server.wait_for(lambda: server.sample("inference_queue_depth") == 1, what="queue depth 1")
        rejected = requests.post(server.url(CHAT), json=chat_body(max_tokens=2), timeout=30)
        assert rejected.status_code == 429
        assert int(rejected.headers["Retry-After"]) >= 1
        error = rejected.json()["error"]
        assert error["code"] == "queue_full" and "queue is full" in error["message"]
        running.close()  # frees the batch slot: the queued request now runs
        assert queued.result().status_code == 200
    assert server.sample("inference_requests_total", status="429", error_type="queue_full") == 1


def test_deadline_ends_a_running_request_with_504(server_factory):
    server = server_factory("--request-timeout", "1")
    started = time.monotonic()
    response = requests.post(server.url("/v1/completions"), json=_long_completion(), timeout=60)
    elapsed = time.monotonic() - started
    assert response.status_code == 504
    error = response.json()["error"]
    assert "deadline of 1 s passed" in error["message"] and error["type"] == "timeout"
    assert elapsed < 30  # bounded by the deadline, not by max_tokens
    server.wait_for(lambda: server.sample("inference_requests_running") == 0, what="slot freed")
    assert requests.post(server.url(CHAT), json=chat_body(max_tokens=2), timeout=30).ok


def test_deadline_counts_queue_time(server_factory):
    server = server_factory("--max-batch-size", "1")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(
            requests.post, server.url("/v1/completions"), json=_long_completion("first"), timeout=60
        )
        server.wait_for(lambda: server.sample("inference_requests_running") == 1, what="running")
        # A gateway with one second left of its budget says so; the request times out waiting.
        second = requests.post(
            server.url("/v1/completions"),
            json=_long_completion("second", max_tokens=3),
            headers={"X-Request-Timeout": "1"},
            timeout=60,
        )
        assert second.status_code == 504
        assert "deadline of 1 s passed in the queue" in second.json()["error"]["message"]
        assert first.result().status_code == 200
    bad = requests.post(
        server.url("/v1/completions"),
        json=_long_completion(max_tokens=2),
        headers={"X-Request-Timeout": "soon"},
        timeout=30,
    )
    assert bad.status_code == 400 and "X-Request-Timeout" in bad.json()["error"]["message"]


def test_stream_past_its_deadline_ends_with_an_error_event(server_factory):
    server = server_factory("--request-timeout", "1")
    client = openai.OpenAI(base_url=server.url("/v1"), api_key="x", max_retries=0, timeout=60)
    stream = client.completions.create(
        model="demo", prompt="s", stream=True, max_tokens=1900, extra_body={"ignore_eos": True}
    )
    with pytest.raises(openai.APIError) as caught:
        for _ in stream:
            pass
    assert "deadline" in str(caught.value)


def test_disconnected_stream_is_cancelled_and_frees_its_slot(server_factory):
    server = server_factory("--max-batch-size", "1")
    sock, _ = _open_stream(server, _long_completion("goes away"))
    sock.close()
    server.wait_for(
        lambda: server.sample("inference_requests_total", error_type="client_disconnected") == 1,
        timeout=30,
        what="the cancelled request to be recorded",
    )
    server.wait_for(lambda: server.sample("inference_requests_running") == 0, what="slot freed")
    # The slot is free: a new request does not wait behind the abandoned one.
    response = requests.post(server.url(CHAT), json=chat_body(max_tokens=2), timeout=30)
    assert response.status_code == 200
    generated = server.sample("inference_generation_tokens_total")
    assert generated < 1900 + 2, "the abandoned request was not cut short"


def test_disconnected_waiting_client_is_cancelled(server_factory):
    server = server_factory("--max-batch-size", "1")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url("/v1/completions"), json=_long_completion("impatient"), timeout=1.0)
    server.wait_for(
        lambda: server.sample("inference_requests_total", error_type="client_disconnected") == 1,
        timeout=30,
        what="the cancelled request to be recorded",
    )
    server.wait_for(lambda: server.sample("inference_requests_running") == 0, what="slot freed")
    assert server.sample("inference_requests_in_flight") == 0
