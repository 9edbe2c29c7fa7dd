"""The server under hostile traffic: connections that never finish their heads, more
connections than it holds, heads h11 cannot read, bodies that take long to read, prompts that
take long to tokenize. Real server processes and real sockets; no timed assertions (bounded
waits, and the order in which answers arrive)."""

from __future__ import annotations

import json
import select
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import requests
from conftest import chat_body, start_server
from prometheus_client.parser import text_string_to_metric_families

from inference.telemetry.metrics import CONNECTION_CLOSE_REASONS
from vigil.netproc import tcp_queues

HEADER_TIMEOUT = 2.0
BODY_TIMEOUT = 2.0
MAX_CONNECTIONS = 16
LONG_TOKEN = "<|" + "z" * 4000 + "|>"


@pytest.fixture(scope="module")
def long_token_model(tmp_path_factory, demo_dir) -> Path:
    """The demo checkpoint with one special token of 4,004 characters in its tokenizer, as real
    vocabularies have long entries: the bound from characters (a prompt of N characters has at
    least N / 4,004 tokens) then lets a prompt of megabytes through to the tokenizer, which is
    what this module needs to hold one up."""
    from inference.model.demo import build_byte_tokenizer, ensure_demo_model

    path = tmp_path_factory.mktemp("long-token") / "demo-long-token"
    shutil.copytree(ensure_demo_model(demo_dir), path)
    build_byte_tokenizer(special_tokens=(LONG_TOKEN,)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, demo_dir, long_token_model):
    """One server for the module: a short head deadline, a small connection cap, and a message
    limit high enough that a body of 219,444 messages is validated whole (it takes a second)."""
    server = start_server(
        tmp_path_factory.mktemp("guarded"),
        demo_dir,
        "--served-model-name",
        "demo",
        "--header-timeout",
        str(HEADER_TIMEOUT),
        "--body-timeout",
        str(BODY_TIMEOUT),
        "--max-connections",
        str(MAX_CONNECTIONS),
        "--max-messages-per-request",
        "1000000",
        model=str(long_token_model),
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def frozen(tmp_path_factory, demo_dir):
    """A server whose engine hangs at its first decode step until it stops: every completion
    sent to it is held, a request in progress with its body in. Its head and body deadlines
    are longer than any test here waits, so that a connection it closes was closed to make
    room and not for a deadline."""
    server = start_server(
        tmp_path_factory.mktemp("frozen"),
        demo_dir,
        "--served-model-name",
        "demo",
        "--enable-fault-injection",
        "--stall-timeout",
        "3600",
        "--stall-floor",  # a step with a prediction stalls past the floor: out of the way too
        "3600",
        "--header-timeout",
        "120",
        "--body-timeout",
        "120",
        "--max-connections",
        str(MAX_CONNECTIONS),
    )
    requests.post(
        server.url("/debug/fault"),
        json={"fault": "hang", "stage": "decode", "seconds": None},
        headers={"Connection": "close"},
        timeout=30,
    ).raise_for_status()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def plain(tmp_path_factory, demo_dir):
    """A server with the default limits (the demo model's context: 2,048 tokens)."""
    server = start_server(
        tmp_path_factory.mktemp("plain"),
        demo_dir,
        "--served-model-name",
        "demo",
        "--header-timeout",
        str(HEADER_TIMEOUT),
        "--max-connections",
        str(MAX_CONNECTIONS),
    )
    yield server
    server.stop()


def _address(server) -> tuple[str, int]:
    host, port = server.base_url.removeprefix("http://").split(":")
    return host, int(port)


def _connect(server) -> socket.socket:
    sock = socket.create_connection(_address(server), timeout=30)
    sock.settimeout(30)
    return sock


def _read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (bounded by the timeout)."""
    reply = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return reply
        reply += chunk


def _json_error(reply: bytes) -> tuple[int, dict]:
    head, _, body = reply.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert b"content-type: application/json" in head.lower(), head
    return status, json.loads(body)["error"]


def _health(server) -> requests.Response:
    # Connection: close: no pooled connection is left open to count against the cap.
    return requests.get(server.url("/health"), headers={"Connection": "close"}, timeout=30)


def _held(server) -> socket.socket:
    """A connection with a request in progress, its body sent and read: a completion that the
    ``frozen`` server's hung engine holds."""
    body = json.dumps({"model": "demo", "prompt": "hello", "max_tokens": 4}).encode()
    return _post_whole(server, "/v1/completions", body, close=False)


def _reasons(server) -> set[str]:
    return {line.get("reason") for line in server.logs() if line.get("reason")}


def test_silent_and_slow_connections_are_closed_after_the_header_timeout(guarded):
    silent = [_connect(guarded) for _ in range(5)]
    slow = [_connect(guarded) for _ in range(4)]
    head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 200
    stop = threading.Event()

    def trickle(sock: socket.socket) -> None:  # one byte every 0.2 s, never the end of it
        for byte in head:
            if stop.wait(0.2):
                return
            try:
                sock.send(bytes([byte]))
            except OSError:
                return

    threads = [threading.Thread(target=trickle, args=(sock,), daemon=True) for sock in slow]
    for thread in threads:
        thread.start()
    try:
        # Meanwhile the server answers.
        assert _health(guarded).status_code == 200
        for sock in silent:  # closed without a word: nothing was asked
            assert _read_until_closed(sock) == b""
        for sock in slow:  # the request had begun: a 408 says why
            status, error = _json_error(_read_until_closed(sock))
            assert status == 408 and error["code"] == "request_head_timeout"
            assert f"within {HEADER_TIMEOUT:g} s" in error["message"]
        assert _health(guarded).status_code == 200
    finally:
        stop.set()
        for sock in silent + slow:
            sock.close()
    guarded.wait_for(
        lambda: {"idle_connection", "slow_request_head"} <= _reasons(guarded),
        what="the log lines of the closed connections",
    )


def test_at_the_cap_a_connection_waiting_for_its_head_gives_way(frozen):
    """The deadlines are far off (120 s): the silent connection is closed to make room."""
    held = [_held(frozen) for _ in range(MAX_CONNECTIONS - 1)]
    silent = _connect(frozen)  # the last place
    try:
        # /health takes the place of the connection that sent nothing.
        assert _health(frozen).status_code == 200
        assert _read_until_closed(silent) == b""
        assert "closed_for_room" in _reasons(frozen)
        assert "idle_connection" not in _reasons(frozen)
    finally:
        silent.close()
        for sock in held:
            sock.close()


def test_at_the_cap_the_silent_give_way_before_the_slow(frozen):
    """At the cap: first a connection that sent nothing, though one mid-head waited longer;
    that one when only it is left."""
    held = [_held(frozen) for _ in range(MAX_CONNECTIONS - 3)]
    started = _connect(frozen)
    started.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
    _wait_read(frozen, started)
    silent = [_connect(frozen), _connect(frozen)]  # after the one that began its head
    try:
        assert _health(frozen).status_code == 200
        assert _read_until_closed(silent[0]) == b""  # the longest silent one gave way
        assert not _answered(started) and not _answered(silent[1])
        silent[1].close()
        held += [_held(frozen), _held(frozen)]  # at the cap, all busy but the one mid-head
        assert _health(frozen).status_code == 200
        status, error = _json_error(_read_until_closed(started))
        assert status == 503 and error["code"] == "too_many_connections"
    finally:
        for sock in held + silent + [started]:
            sock.close()


def test_at_the_cap_with_every_connection_busy_a_new_one_gets_503(frozen):
    held = [_held(frozen) for _ in range(MAX_CONNECTIONS)]
    try:
        refused = _connect(frozen)
        status, error = _json_error(_read_until_closed(refused))
        refused.close()
        assert status == 503 and error["code"] == "too_many_connections"
        assert f"holds {MAX_CONNECTIONS} connections" in error["message"]
        # A client that sends its request at once reads the same answer.
        response = _health(frozen)
        assert response.status_code == 503 and response.headers["Retry-After"] == "1"
    finally:
        for sock in held:
            sock.close()
    # Room again once the busy ones are gone.
    frozen.wait_for(lambda: _health(frozen).status_code == 200, what="room for /health")
    assert "connection_limit" in _reasons(frozen)


def _stalled_body(server, path: str = "/v1/completions") -> socket.socket:
    """A request whose head and first bytes of body came, and then nothing."""
    sock = _connect(server)
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n".encode()
        + b'{"model": "demo", '
    )
    _wait_read(server, sock)
    return sock


def test_at_the_cap_a_connection_whose_body_stalled_gives_way(frozen):
    held = [_held(frozen) for _ in range(MAX_CONNECTIONS - 1)]
    stalled = _stalled_body(frozen)
    try:
        # At the cap, with every other connection busy: a body that moves gives way to none.
        refused = _connect(frozen)
        assert _json_error(_read_until_closed(refused))[1]["code"] == "too_many_connections"
        refused.close()
        assert not _answered(stalled)
        time.sleep(1.2)  # a second without a byte of it: stalled
        assert _health(frozen).status_code == 200
        status, error = _json_error(_read_until_closed(stalled))
        assert status == 503 and error["code"] == "too_many_connections"
        assert "body had stopped arriving" in error["message"]
    finally:
        stalled.close()
        for sock in held:
            sock.close()


def test_a_body_that_stops_arriving_gets_408_after_the_body_timeout(guarded):
    before, _ = _connection_metrics(guarded)
    sock = _stalled_body(guarded, "/v1/chat/completions")
    try:
        status, error = _json_error(_read_until_closed(sock))
    finally:
        sock.close()
    assert status == 408 and error["code"] == "request_body_timeout"
    assert f"nothing of it came for {BODY_TIMEOUT:g} s" in error["message"]
    assert "--body-timeout" in error["message"]
    after, _ = _connection_metrics(guarded)
    assert after["slow_request_body"] - before["slow_request_body"] == 1
    assert "slow_request_body" in _reasons(guarded)
    # The request is recorded with the server's answer, not as a client that left.
    guarded.wait_for(
        lambda: _request_count(guarded, status="408", endpoint="chat") >= 1,
        what="the request recorded with 408",
    )


def test_a_pipelined_head_begun_during_a_response_gets_the_header_timeout(guarded):
    """The next request's head began while the first was answered: uvicorn's keep-alive timer
    would close it in silence; it gets the head deadline and a 408."""
    sock = _connect(guarded)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /health HTTP/1.1\r\nHo")
    reply = _read_until_closed(sock)
    sock.close()
    first, _, rest = reply.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200"), reply
    status, error = _json_error(rest[rest.index(b"HTTP/1.1") :])
    assert status == 408 and error["code"] == "request_head_timeout"


def test_a_websocket_upgrade_is_answered_as_a_request_and_its_connection_let_go(guarded):
    before = _connection_metrics(guarded)[1]
    for _ in range(MAX_CONNECTIONS + 2):  # more than the cap: none is left holding a place
        sock = _connect(guarded)
        sock.sendall(
            b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            b"Connection: close\r\n\r\n"
        )
        assert _read_until_closed(sock).startswith(b"HTTP/1.1 200")
        sock.close()
    guarded.wait_for(
        lambda: _connection_metrics(guarded)[1] <= before, what="the upgraded connections let go"
    )
    assert _health(guarded).status_code == 200


def test_the_server_runs_no_websocket_protocol():
    """Were websockets or wsproto installed, uvicorn's default (ws="auto") would hand an
    upgraded connection to it, and the guard would never see it close."""
    from inference.__main__ import server_config
    from inference.http.connections import ConnectionGuard

    config = server_config(lambda scope, receive, send: None, ConnectionGuard(4, 1.0))
    config.load()
    assert config.ws == "none" and config.ws_protocol_class is None


def test_a_malformed_header_line_is_not_echoed(guarded):
    """h11's message quotes the line, token and all; neither the answer nor the log does."""
    secret = b"sk-SECRET-" + str(time.time_ns()).encode()
    sock = _connect(guarded)
    sock.sendall(
        b"GET /health HTTP/1.1\r\nHost: x\r\nAuthorization : Bearer " + secret + b"\r\n\r\n"
    )
    reply = _read_until_closed(sock)
    sock.close()
    status, error = _json_error(reply)
    assert status == 400 and error["message"] == (
        "the request is not valid HTTP/1.1: a header line is malformed"
    )
    assert secret not in reply
    guarded.wait_for(
        lambda: "a header line is malformed" in guarded.log_path.read_text(),
        what="the log line",
    )
    assert secret.decode() not in guarded.log_path.read_text()


def test_an_over_long_head_gets_431_and_a_bad_one_400_in_json(guarded):
    sock = _connect(guarded)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000)
    status, error = _json_error(_read_until_closed(sock))
    sock.close()
    assert status == 431 and error["code"] == "request_header_fields_too_large"
    assert "over 16384 bytes" in error["message"]
    assert set(error) == {"message", "type", "param", "code"}

    sock = _connect(guarded)
    sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
    status, error = _json_error(_read_until_closed(sock))
    sock.close()
    assert status == 400 and error["code"] == "invalid_http_request"
    assert error["message"].startswith("the request is not valid HTTP/1.1")
    assert _health(guarded).status_code == 200


def test_the_rest_of_an_answered_body_must_arrive_within_the_header_timeout(guarded):
    """A 413 answered from Content-Length, the body then trickled: uvicorn would read and drop
    it for as long as it came; the connection is closed instead."""
    sock = _connect(guarded)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 900000000\r\n\r\n{")
    reply = b""
    while b"request_too_large" not in reply:
        chunk = sock.recv(65536)
        assert chunk, reply
        reply += chunk
    assert reply.startswith(b"HTTP/1.1 413")
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            sock.send(b"x")
            time.sleep(0.2)
    except OSError:  # closed (a reset, as the server left bytes unread)
        pass
    else:
        pytest.fail("the connection stayed open while the unread body trickled in")
    finally:
        sock.close()


def test_a_long_tokenization_holds_up_no_other_request(guarded):
    """A prompt of 4 MB passes the bound from characters (this tokenizer has a token of 4,004
    characters) and takes seconds to tokenize before it is refused as too long; a 2-token chat
    sent while it tokenizes is answered first."""
    finished: dict[str, float] = {}
    answers: dict[str, requests.Response] = {}

    def send(name: str, path: str, body: dict) -> None:
        answers[name] = requests.post(guarded.url(path), json=body, timeout=120)
        finished[name] = time.monotonic()

    big = threading.Thread(
        target=send,
        args=("big", "/v1/completions", {"model": "demo", "prompt": "word " * 800_000}),
    )
    big.start()
    time.sleep(0.5)  # the upload is done and the big prompt is in the tokenizer
    send("small", "/v1/chat/completions", chat_body(max_tokens=2))
    big.join(120)
    assert answers["small"].status_code == 200, answers["small"].text
    assert answers["big"].status_code == 400
    error = answers["big"].json()["error"]
    assert error["code"] == "context_length_exceeded" and "4000000 tokens" in error["message"]
    assert finished["small"] < finished["big"]


def _post_whole(server, path: str, body: bytes, close: bool = True) -> socket.socket:
    """A POST of ``body`` on a socket of its own, returned once the server has read every
    byte of it (the kernel's queues on both sides empty): what follows happens after the
    upload, while the server works on the body."""
    sock = _connect(server)
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nX-Request-Timeout: 100\r\n".encode()
        + (b"Connection: close\r\n" if close else b"")
        + b"\r\n"
        + body
    )
    _wait_read(server, sock)
    return sock


def _wait_read(server, sock: socket.socket) -> None:
    """Until the server has read everything sent on ``sock`` so far."""
    client, peer = sock.getsockname(), sock.getpeername()

    def all_read() -> bool:
        ours, theirs = tcp_queues(client, peer), tcp_queues(peer, client)
        # Nothing left to send here, nothing left unread there (or its socket closed).
        return ours is not None and ours[0] == 0 and (theirs is None or theirs[1] == 0)

    server.wait_for(all_read, what="the server to read what was sent")


def _answered(sock: socket.socket) -> bool:
    """Whether the server has begun to answer on ``sock`` (without reading it)."""
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


def test_health_answers_while_a_huge_body_is_validated(guarded):
    """219,444 tiny messages (7.5 MB): reading and validating them takes the CPU for a second,
    off the event loop; /health sent once the whole body is in is answered while it is read.
    (A generation meanwhile is slower: the thread that validates holds the GIL between the
    loop's turns.)"""
    body = json.dumps(
        {"model": "demo", "messages": [{"role": "user", "content": "x"}] * 219_444}
    ).encode()
    big = _post_whole(guarded, "/v1/chat/completions", body)
    try:
        assert _health(guarded).status_code == 200
        assert not _answered(big), "the big body was answered before /health"
        status, error = _json_error(_read_until_closed(big))
    finally:
        big.close()
    assert status == 400  # more messages than the context has tokens
    assert "219444 messages" in error["message"]


# Bodies that json.loads would read in C without a call to Python, holding the GIL (and so
# the event loop) for seconds even in a worker thread: refused from a count of their values.
HOSTILE_SHAPES = {
    "nested-arrays": b'{"model":"demo","messages":[{"role":"user","content":"hi"}],"x":['
    + b"[]," * (10 * 1024 * 1024)
    + b"[]]}",
    "one-big-object": b'{"model":"demo","messages":[{"role":"user","content":"hi"}],"x":{'
    + b",".join(b'"k%d":0' % i for i in range(2_500_000))
    + b"}}",
    "token-ids": b'{"model":"demo","prompt":[' + b"1," * (8 * 1024 * 1024) + b"1]}",
}


@pytest.mark.parametrize("shape", sorted(HOSTILE_SHAPES))
def test_a_body_of_millions_of_json_values_is_refused_before_it_is_parsed(plain, shape):
    body = HOSTILE_SHAPES[shape]
    path = "/v1/completions" if shape == "token-ids" else "/v1/chat/completions"
    sock = _post_whole(plain, path, body)
    try:
        assert _health(plain).status_code == 200
        status, error = _json_error(_read_until_closed(sock))
    finally:
        sock.close()
    assert status == 400 and error["code"] == "too_many_json_values", error
    limit = 16 * 4096 + 2048 + 1024  # the default --max-messages-per-request, the context
    assert f"at most {limit} in one request" in error["message"]
    assert "--max-messages-per-request" in error["message"]
    # A request of as many values as the limit allows is read (and refused for its length).
    prompt = [1] * 2048
    response = requests.post(
        plain.url("/v1/completions"), json={"model": "demo", "prompt": prompt}, timeout=30
    )
    assert response.json()["error"]["code"] == "context_length_exceeded"


def _connection_metrics(server) -> tuple[dict[str, float], float]:
    """inference_connections_closed_total by reason, and inference_connections_open (summed
    over processes), from the server's /metrics."""
    text = requests.get(server.url("/metrics"), headers={"Connection": "close"}, timeout=30).text
    closed: dict[str, float] = {}
    opened = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "inference_connections_closed_total":
                reason = sample.labels["reason"]
                closed[reason] = closed.get(reason, 0.0) + sample.value
            elif sample.name == "inference_connections_open":
                opened += sample.value
    return closed, opened


def _request_count(server, **labels: str) -> float:
    text = requests.get(server.url("/metrics"), headers={"Connection": "close"}, timeout=30).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "inference_requests_total"
        and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def test_every_connection_the_server_closes_is_counted_by_reason(guarded):
    """The log sums the closed connections per interval; the counter counts each one."""
    before, _ = _connection_metrics(guarded)
    kept = requests.Session()  # kept alive after its answer, then quiet: uvicorn's timer
    assert kept.get(guarded.url("/health"), timeout=30).status_code == 200
    silent = [_connect(guarded) for _ in range(3)]
    try:
        _, opened = _connection_metrics(guarded)
        assert opened >= 3  # the silent three (and the scrape's own connection)
        for sock in silent:
            assert _read_until_closed(sock) == b""
    finally:
        for sock in silent:
            sock.close()
    bad = _connect(guarded)
    bad.sendall(b"NOT HTTP AT ALL\r\n\r\n")
    _read_until_closed(bad)
    bad.close()
    guarded.wait_for(
        lambda: (
            _connection_metrics(guarded)[0]["keep_alive_timeout"] > before["keep_alive_timeout"]
        ),
        what="the kept-alive connection closed by the keep-alive timer",
    )
    kept.close()
    after, opened = _connection_metrics(guarded)
    assert after["keep_alive_timeout"] - before["keep_alive_timeout"] == 1
    assert after.get("idle_connection", 0) - before.get("idle_connection", 0) == 3
    assert after.get("invalid_http_request", 0) - before.get("invalid_http_request", 0) == 1
    assert opened >= 1  # the scrape's own; the closed ones are gone
    # Every reason has its series from the start (rate() sees the first one), and every reason
    # the connection layer logged in this module's tests is one of them.
    assert set(before) == set(CONNECTION_CLOSE_REASONS)
    assert _reasons(guarded) <= set(CONNECTION_CLOSE_REASONS)


def test_the_tokenizer_pool_uses_the_copies_made_at_load_and_keeps_one_for_short_prompts():
    """No request copies a tokenizer (a deep copy holds the GIL for a third of a second with a
    large vocabulary): the pool hands out the copies the loader made, and long prompts never
    hold the last one."""
    import asyncio

    from inference.api.tokenizers import TokenizerPool

    copies = (object(), object(), object())
    pool = TokenizerPool(long_chars=10)
    gate = threading.Event()
    used: list[tuple[str, object]] = []

    def work(name: str, wait: bool):
        def run(tokenizer: object) -> str:
            used.append((name, tokenizer))
            if wait:
                gate.wait(30)
            return name

        return run

    async def scenario() -> list[str]:
        longs = [
            asyncio.ensure_future(pool.run(copies, 100, work(f"long{i}", True))) for i in range(3)
        ]
        await asyncio.sleep(0.2)  # two long prompts hold two tokenizers; the third waits
        short = await pool.run(copies, 1, work("short", False))
        gate.set()
        return [short, *await asyncio.gather(*longs)]

    finished = asyncio.run(scenario())
    assert finished == ["short", "long0", "long1", "long2"]
    assert {id(tokenizer) for _, tokenizer in used} <= {id(c) for c in copies}
    assert [name for name, _ in used][:3] == ["long0", "long1", "short"]


def test_request_bodies_past_the_memory_budget_get_503(plain):
    """The API holds at most 8 x --max-body-bytes of bodies at once: eight uploads of the
    largest body under way, a ninth is refused before a byte of it is read."""
    limit = 32 * 1024 * 1024  # the default --max-body-bytes
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {limit}\r\n\r\n"
    ).encode()
    uploads = [_connect(plain) for _ in range(8)]
    try:
        for sock in uploads:
            sock.sendall(head + b"{")
            _wait_read(plain, sock)
        refused = _connect(plain)
        refused.sendall(head + b"{")
        status, error = _json_error(_read_until_closed(refused))
        refused.close()
        assert status == 503 and error["code"] == "request_bodies_over_budget"
        assert f"limit of {8 * limit} bytes (8 x --max-body-bytes)" in error["message"]
        assert not any(_answered(sock) for sock in uploads)
    finally:
        for sock in uploads:
            sock.close()
    plain.wait_for(
        lambda: _request_count(plain, status="503", endpoint="chat") >= 1,
        what="the refusal counted",
    )
    # Given back once the uploads are gone.
    plain.wait_for(
        lambda: (
            requests.post(
                plain.url("/v1/chat/completions"),
                data=b"{" + b" " * (limit - 2) + b"}",
                headers={"Connection": "close"},
                timeout=60,
            ).status_code
            == 400
        ),
        what="room for a body of the largest size",
    )


def test_the_wait_for_a_tokenizer_is_bounded_by_the_deadline(guarded):
    """A prompt of 4 MB takes seconds to tokenize; with half a second left it gets 504."""
    response = requests.post(
        guarded.url("/v1/completions"),
        json={"model": "demo", "prompt": "word " * 800_000},
        headers={"X-Request-Timeout": "0.5", "Connection": "close"},
        timeout=120,
    )
    assert response.status_code == 504, response.text
    error = response.json()["error"]
    assert error["code"] == "deadline_exceeded" and "tokenizing the prompt" in error["message"]
