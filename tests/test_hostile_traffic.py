"""The server under hostile traffic: bodies that take long to read, prompts that take long to
tokenize. Real server processes; no timed assertions (the order in which answers arrive)."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import requests
from conftest import chat_body, start_server

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
    """One server for the module, with a message limit high enough that a body of 219,444
    messages is validated whole (it takes a second)."""
    server = start_server(
        tmp_path_factory.mktemp("guarded"),
        demo_dir,
        "--served-model-name",
        "demo",
        "--max-messages-per-request",
        "1000000",
        model=str(long_token_model),
    )
    yield server
    server.stop()


def _health(server) -> requests.Response:
    # Connection: close: no pooled connection is left open to count against the cap.
    return requests.get(server.url("/health"), headers={"Connection": "close"}, timeout=30)


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


def test_health_answers_while_a_huge_body_is_validated(guarded):
    """219,444 tiny messages (7.5 MB): reading and validating them takes the CPU for a second,
    off the event loop; /health sent meanwhile is answered first. (A generation meanwhile is
    slower: the thread that validates holds the GIL between the loop's turns.)"""
    body = {"model": "demo", "messages": [{"role": "user", "content": "x"}] * 219_444}
    finished: dict[str, float] = {}
    answers: dict[str, requests.Response] = {}

    def send_big() -> None:
        answers["big"] = requests.post(
            guarded.url("/v1/chat/completions"), data=json.dumps(body), timeout=120
        )
        finished["big"] = time.monotonic()

    big = threading.Thread(target=send_big)
    big.start()
    time.sleep(0.3)  # the upload (loopback) is done: the server reads the body
    answers["health"] = _health(guarded)
    finished["health"] = time.monotonic()
    big.join(120)
    assert answers["health"].status_code == 200
    assert answers["big"].status_code == 400  # more messages than the context has tokens
    assert "219444 messages" in answers["big"].json()["error"]["message"]
    assert finished["health"] < finished["big"]
