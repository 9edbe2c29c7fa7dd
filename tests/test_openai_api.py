"""The official openai client against the real server, streaming and not."""

from __future__ import annotations

import openai
import pytest
import requests
from conftest import chat_body


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0, timeout=60)


def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["demo"]


def test_chat_completion_with_open_autoglm_parameters(client):
    response = client.chat.completions.create(
        model="demo",
        messages=[
            {"role": "system", "content": "You are a phone agent."},
            {"role": "user", "content": "Open the settings app."},
        ],
        max_tokens=24,
        temperature=0.1,
        top_p=0.85,
        frequency_penalty=0.2,
    )
    choice = response.choices[0]
    assert response.object == "chat.completion"
    assert response.model == "demo"
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason == "length"
    assert response.usage.completion_tokens == 24
    assert response.usage.prompt_tokens > 0
    assert response.usage.total_tokens == response.usage.prompt_tokens + 24


def test_chat_stream_matches_the_non_streamed_answer(client):
    kwargs = dict(
        model="demo",
        messages=[{"role": "user", "content": "stream me"}],
        max_tokens=30,
        temperature=0,
    )
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    # Per token: one content chunk per generated token for this byte-level model.
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) > 10


def test_stream_with_usage(client):
    chunks = list(
        client.chat.completions.create(
            model="demo",
            messages=[{"role": "user", "content": "usage"}],
            max_tokens=7,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 7


def test_completions_streaming_and_not(client):
    whole = client.completions.create(
        model="demo", prompt="Once upon a time", max_tokens=16, temperature=0
    )
    assert whole.object == "text_completion"
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 16
    streamed = list(
        client.completions.create(
            model="demo", prompt="Once upon a time", max_tokens=16, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text
    assert streamed[-1].choices[0].finish_reason == "length"


def test_completion_from_token_ids(client):
    response = client.completions.create(model="demo", prompt=[72, 105], max_tokens=3)
    assert response.usage.prompt_tokens == 2
    assert response.usage.completion_tokens == 3


def test_stop_string_ends_the_answer(client):
    base = (
        client.completions.create(model="demo", prompt="stop test", max_tokens=40, temperature=0)
        .choices[0]
        .text
    )
    stop = base[10:13]
    first = base.find(stop)
    response = client.completions.create(
        model="demo", prompt="stop test", max_tokens=40, temperature=0, stop=[stop]
    )
    assert response.choices[0].text == base[:first]
    assert response.choices[0].finish_reason == "stop"
    streamed = list(
        client.completions.create(
            model="demo", prompt="stop test", max_tokens=40, temperature=0, stop=[stop], stream=True
        )
    )
    assert "".join(c.choices[0].text for c in streamed) == base[:first]
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_sampling_parameters_change_the_answer(client):
    greedy = {
        client.completions.create(model="demo", prompt="same", max_tokens=20, temperature=0)
        .choices[0]
        .text
        for _ in range(2)
    }
    assert len(greedy) == 1, "greedy decoding must be deterministic"
    sampled = {
        client.completions.create(model="demo", prompt="same", max_tokens=20, temperature=2.0)
        .choices[0]
        .text
        for _ in range(4)
    }
    assert len(sampled) > 1


def test_min_tokens_and_ignore_eos_are_accepted(client):
    response = client.completions.create(
        model="demo", prompt="x", max_tokens=5, extra_body={"min_tokens": 5, "ignore_eos": True}
    )
    assert response.usage.completion_tokens == 5


def test_request_id_is_echoed(server):
    response = requests.post(
        server.url("/v1/chat/completions"),
        json=chat_body(max_tokens=2),
        headers={"X-Request-Id": "abc-123"},
        timeout=30,
    )
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "abc-123"
    assert response.json()["id"] == "abc-123"
    assert len(response.headers["x-trace-id"]) == 32


def test_health_ready_and_unknown_route(server):
    assert requests.get(server.url("/health"), timeout=5).json() == {"status": "ok"}
    ready = requests.get(server.url("/ready"), timeout=5).json()
    assert ready["status"] == "ready" and ready["model"] == "demo"
    missing = requests.get(server.url("/v1/nothing"), timeout=5)
    assert missing.status_code == 404 and "error" in missing.json()


def test_bearer_token_auth(server_factory):
    secured = server_factory(env={"VIGIL_INFERENCE_API_KEY": "s3cret"})
    bad = openai.OpenAI(base_url=secured.url("/v1"), api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        bad.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "x"}], max_tokens=2
        )
    assert "API key" in caught.value.message
    missing = requests.post(
        secured.url("/v1/chat/completions"), json=chat_body(max_tokens=2), timeout=30
    )
    assert missing.status_code == 401
    assert missing.json()["error"]["type"] == "authentication_error"
    good = openai.OpenAI(base_url=secured.url("/v1"), api_key="s3cret", max_retries=0)
    assert good.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "x"}], max_tokens=2
    ).choices
    # Probes stay open: a supervisor has no key.
    assert requests.get(secured.url("/health"), timeout=5).status_code == 200
    assert requests.get(secured.url("/metrics"), timeout=5).status_code == 200


# ---- OpenAI's contract, as its API description and the official client expect ------------------


def test_null_parameters_are_read_as_left_out(server):
    chat = {
        "model": "demo",
        "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 4,
        "stream": None,
        "stream_options": None,
        "temperature": None,
        "top_p": None,
        "stop": None,
        "n": None,
        "logprobs": None,
        "logit_bias": None,
        "tools": None,
        "response_format": None,
        "seed": None,
        "user": None,
    }
    response = requests.post(server.url("/v1/chat/completions"), json=chat, timeout=60)
    assert response.status_code == 200, response.text
    completion = {"model": "demo", "prompt": "x", "max_tokens": 4, "echo": None, "suffix": None}
    response = requests.post(server.url("/v1/completions"), json=completion, timeout=60)
    assert response.status_code == 200, response.text
    left_out = requests.post(
        server.url("/v1/completions"), json={"model": "demo", "prompt": None}, timeout=60
    )
    assert left_out.status_code == 400
    assert left_out.json()["error"]["message"] == "'prompt' is a required property"


def test_chat_messages_carry_a_null_refusal(server):
    body = {"model": "demo", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    message = requests.post(server.url("/v1/chat/completions"), json=body, timeout=60).json()[
        "choices"
    ][0]["message"]
    assert "refusal" in message and message["refusal"] is None
    client = openai.OpenAI(base_url=server.url("/v1"), api_key="x", max_retries=0)
    reply = client.chat.completions.create(model="demo", messages=body["messages"], max_tokens=2)
    assert reply.choices[0].message.refusal is None


def test_completions_default_to_16_tokens_and_chat_to_the_context(server):
    client = openai.OpenAI(base_url=server.url("/v1"), api_key="x", max_retries=0, timeout=120)
    completion = client.completions.create(
        model="demo", prompt="count", extra_body={"ignore_eos": True}
    )
    assert completion.usage.completion_tokens == 16  # OpenAI's default for completions
    chat = client.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": "go"}],
        stop=["\n", " ", "e"],
    )
    assert chat.choices[0].finish_reason in ("stop", "length")


def test_top_p_zero_is_greedy(server):
    client = openai.OpenAI(base_url=server.url("/v1"), api_key="x", max_retries=0, timeout=120)

    def answer(**sampling) -> str:
        return (
            client.completions.create(model="demo", prompt="greedy?", max_tokens=12, **sampling)
            .choices[0]
            .text
        )

    greedy = answer(temperature=0)
    assert answer(top_p=0, temperature=1.5) == greedy
    assert answer(top_p=0) == greedy
