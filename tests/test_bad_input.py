"""Every bad input gets a 4xx with an OpenAI-shaped error that says what was wrong."""

from __future__ import annotations

import json

import pytest
import requests
from conftest import chat_body

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def _user(content):
    return [{"role": "user", "content": content}]


CASES = [
    # (id, path, raw body or JSON-able, expected status, words the message must hold)
    ("malformed-json", CHAT, b'{"model": "demo", "messages": [', 400, "not valid JSON"),
    ("not-an-object", CHAT, b"[1, 2, 3]", 400, "must be a JSON object"),
    ("empty-body", CHAT, b"", 400, "empty"),
    ("not-utf8", CHAT, b'{"model": "demo", "messages": "\xff\xfe"}', 400, "not valid UTF-8"),
    ("missing-model", CHAT, {"messages": _user("hi")}, 400, "'model' is a required"),
    ("missing-messages", CHAT, {"model": "demo"}, 400, "'messages' is a required"),
    ("empty-messages", CHAT, {"model": "demo", "messages": []}, 400, "at least one message"),
    ("messages-not-list", CHAT, {"model": "demo", "messages": "hi"}, 400, "'messages'"),
    (
        "unknown-role",
        CHAT,
        {"model": "demo", "messages": [{"role": "robot", "content": "x"}]},
        400,
        "unknown role 'robot'",
    ),
    (
        "content-wrong-type",
        CHAT,
        {"model": "demo", "messages": [{"role": "user", "content": 5}]},
        400,
        "messages[0].content",
    ),
    (
        "missing-content",
        CHAT,
        {"model": "demo", "messages": [{"role": "user"}]},
        400,
        "content is required",
    ),
    (
        "image-part",
        CHAT,
        {
            "model": "demo",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
                    ],
                }
            ],
        },
        400,
        "the model 'demo' is text-only: it cannot read image parts",
    ),
    ("max-tokens-zero", CHAT, chat_body(max_tokens=0), 400, "'max_tokens' must be at least 1"),
    ("max-tokens-negative", CHAT, chat_body(max_tokens=-5), 400, "at least 1, got -5"),
    ("max-tokens-over-limit", CHAT, chat_body(max_tokens=100000), 400, "above this server's limit"),
    ("max-tokens-string", CHAT, chat_body(max_tokens="12"), 400, "'max_tokens'"),
    ("max-tokens-float", CHAT, chat_body(max_tokens=1.5), 400, "'max_tokens'"),
    ("temperature-string", CHAT, chat_body(temperature="hot"), 400, "'temperature'"),
    ("temperature-too-high", CHAT, chat_body(temperature=5), 400, "'temperature'"),
    ("top-p-negative", CHAT, chat_body(top_p=-0.1), 400, "'top_p'"),
    ("logit-bias", CHAT, chat_body(logit_bias={"50": 10}), 400, "logit_bias is not supported"),
    ("stream-not-bool", CHAT, chat_body(stream="yes"), 400, "'stream'"),
    ("n-two", CHAT, chat_body(n=2), 400, "only n=1"),
    ("too-many-stops", CHAT, chat_body(stop=["a", "b", "c", "d", "e"]), 400, "at most 4"),
    (
        "tools",
        CHAT,
        chat_body(tools=[{"type": "function", "function": {"name": "f"}}]),
        400,
        "tools",
    ),
    ("min-over-max", CHAT, chat_body(max_tokens=3, min_tokens=5), 400, "'min_tokens'"),
    (
        "unknown-model",
        CHAT,
        {"model": "gpt-9", "messages": _user("hi")},
        404,
        "'gpt-9' does not exist",
    ),
    (
        "prompt-too-long",
        COMPLETIONS,
        {"model": "demo", "prompt": "x" * 3000},
        400,
        "maximum context length is 2048 tokens, but the prompt has 3000 tokens",
    ),
    (
        "prompt-plus-max-tokens-too-long",
        COMPLETIONS,
        {"model": "demo", "prompt": "x" * 2000, "max_tokens": 100},
        400,
        "2100 were requested (2000 in the prompt, 100 for the completion)",
    ),
    ("prompt-missing", COMPLETIONS, {"model": "demo"}, 400, "'prompt' is a required"),
    ("prompt-empty", COMPLETIONS, {"model": "demo", "prompt": ""}, 400, "prompt is empty"),
    ("prompt-wrong-type", COMPLETIONS, {"model": "demo", "prompt": {"a": 1}}, 400, "'prompt'"),
    (
        "token-id-out-of-range",
        COMPLETIONS,
        {"model": "demo", "prompt": [1, 99999]},
        400,
        "token id 99999 is outside the vocabulary",
    ),
    (
        "nested-too-deeply",
        COMPLETIONS,
        b'{"model": "demo", "prompt": "x", "a": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
        400,
        "nested too deeply",
    ),
    (
        "huge-integer",
        CHAT,
        b'{"model": "demo", "messages": [], "x": 1' + b"1" * 5000 + b"}",
        400,
        "cannot be read",
    ),
    (
        "lone-surrogate",
        COMPLETIONS,
        b'{"model": "demo", "prompt": "hi \\ud800 there"}',
        400,
        "unpaired UTF-16 surrogate",
    ),
    (
        "many-null-messages",  # counted before they are validated
        CHAT,
        b'{"model": "demo", "messages": [' + b"null, " * 60_000 + b"null]}",
        400,
        "the request has 60001 message(s) with 0 content part(s) in all; at most 4096 of each",
    ),
    (
        "a-million-values",  # refused from a count of its commas, before it is parsed
        CHAT,
        b'{"model": "demo", "messages": [' + b"null, " * 1_000_000 + b"null]}",
        400,
        "the request body holds up to 1000003 JSON values",
    ),
    (
        "many-bad-messages",
        CHAT,
        {"model": "demo", "messages": [None] * 4000},
        400,
        "'messages[0]': Input should be a valid dictionary",
    ),
    (
        "too-many-content-parts",
        CHAT,
        {"model": "demo", "messages": [{"role": "user", "content": [{"type": "text"}] * 5000}]},
        400,
        "has 1 message(s) with 5000 content part(s) in all; at most 4096 of each are accepted",
    ),
    (
        "object-too-large",
        CHAT,
        chat_body(logit_bias={str(i): 0 for i in range(5000)}),
        400,
        "a JSON object of 5000 members; no object of this API takes more than 1024",
    ),
    (
        "prompt-list-over-the-context",
        COMPLETIONS,
        {"model": "demo", "prompt": [1] * 60_000},
        400,
        "maximum context length is 2048 tokens, but the prompt is a list of 60000 items",
    ),
    (
        "large-malformed-json",  # over 64 KiB: read in a worker thread, the same answer
        COMPLETIONS,
        b'{"model": "demo", "prompt": "' + b"x" * 100_000,
        400,
        "not valid JSON",
    ),
    (
        "large-lone-surrogate",
        COMPLETIONS,
        b'{"model": "demo", "prompt": "' + b"x" * 100_000 + b'\\udc00"}',
        400,
        "unpaired UTF-16 surrogate",
    ),
    (
        "stream-options-without-stream",
        CHAT,
        chat_body(stream_options={"include_usage": True}),
        400,
        "only allowed when stream is true",
    ),
    (
        "several-prompts",
        COMPLETIONS,
        {"model": "demo", "prompt": ["a", "b"]},
        400,
        "one prompt per request",
    ),
]


@pytest.mark.parametrize(
    "path,body,status,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_gets_a_clear_4xx(server, path, body, status, words):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = requests.post(
        server.url(path), data=data, headers={"Content-Type": "application/json"}, timeout=30
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words in error["message"], error["message"]
    assert error["type"]


def test_a_surrogate_pair_escape_is_text(server):
    body = b'{"model": "demo", "prompt": "smile \\ud83d\\ude00", "max_tokens": 1}'
    response = requests.post(server.url(COMPLETIONS), data=body, timeout=30)
    assert response.status_code == 200, response.text


def test_body_over_the_size_limit_gets_413(server_factory):
    small = server_factory("--max-body-bytes", "1000")
    response = requests.post(small.url(CHAT), json=chat_body("x" * 5000), timeout=30)
    assert response.status_code == 413
    assert "above the limit of 1000 bytes" in response.json()["error"]["message"]
    # Without a Content-Length (chunked upload) the limit holds too.
    chunks = iter(
        [b'{"model": "demo", "messages": [{"role": "user", "content": "', b"y" * 3000, b'"}]}']
    )
    response = requests.post(small.url(CHAT), data=chunks, timeout=30)
    assert response.status_code == 413
    # The server is still fine afterwards.
    assert requests.post(small.url(CHAT), json=chat_body(max_tokens=2), timeout=30).ok


def test_bad_input_never_breaks_the_server(server):
    """After all the bad requests, a good one still works, and none was a 5xx."""
    response = requests.post(server.url(CHAT), json=chat_body(max_tokens=3), timeout=30)
    assert response.status_code == 200
    server_errors = [line for line in server.logs() if line.get("status", 0) >= 500]
    assert server_errors == []


def test_wrong_method_is_405_with_allow(server):
    response = requests.get(server.url(CHAT), timeout=5)
    assert response.status_code == 405
    assert response.headers["Allow"] == "POST"
    assert "use POST" in response.json()["error"]["message"]


def test_a_nan_temperature_is_named_as_not_a_number(server):
    # Python's JSON reader takes the NaN literal, as many clients write it.
    body = '{"model": "demo", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}'
    response = requests.post(
        server.url(CHAT), data=body, headers={"content-type": "application/json"}, timeout=30
    )
    assert response.status_code == 400
    assert "'temperature': Input should be a finite number" in response.json()["error"]["message"]


def test_slow_upload_is_bounded_by_the_deadline(server):
    import socket

    host, port = server.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
            b'X-Request-Timeout: 1\r\n\r\n{"model"'
        )
        reply = b""
        while b"did not arrive" not in reply:  # headers and body may come in two segments
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b"did not arrive within" in reply


def test_a_huge_prompt_is_refused_before_tokenizing_and_holds_nobody_up(server):
    """A prompt of millions of characters (under the body limit) cannot fit the context
    whatever its tokens: it is refused at once, and a small request beside it is not held up
    behind its tokenization."""
    import concurrent.futures

    huge = "word " * 1_500_000  # 7.5 MB
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        big = pool.submit(
            requests.post,
            server.url("/v1/completions"),
            json={"model": "demo", "prompt": huge, "max_tokens": 4},
            timeout=120,
        )
        small = pool.submit(
            requests.post, server.url(CHAT), json=chat_body(max_tokens=2), timeout=120
        )
        refused, served = big.result(), small.result()
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    assert "7500000 characters, at least" in error["message"]
    assert served.status_code == 200
    # The same check for chat: the templated prompt, and a flood of tiny messages.
    chat = requests.post(
        server.url(CHAT),
        json={"model": "demo", "messages": [{"role": "user", "content": huge}]},
        timeout=120,
    )
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages"
    many = requests.post(
        server.url(CHAT),
        json={"model": "demo", "messages": [{"role": "user", "content": "x"}] * 3000},
        timeout=120,
    )
    assert many.status_code == 400  # under --max-messages-per-request, over the context
    assert "3000 messages, at least 3000 tokens" in many.json()["error"]["message"]
