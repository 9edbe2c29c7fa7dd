"""Vision-language serving end to end, on demo-vl (a tiny GLM-4.1V): Open-AutoGLM's own requests,
image and text requests batched together, every bad image refused with a 400 that says why,
image metrics, spans and log fields, /health while images are fetched, and the watchdog's
stage ``vision`` (a hung vision tower, hung preprocessing; a slow download is no stall).

Helpers (screenshots, hostile images, a trickling image server, the system prompt's stand-in)
are in vision_fixtures.py."""

from __future__ import annotations

import base64
import concurrent.futures
import time
import uuid

import openai
import pytest
import requests
from conftest import free_port, start_server
from vision_fixtures import (
    PHONE,
    TricklingImageServer,
    autoglm_system_prompt,
    data_url,
    header_bomb_png,
    image_part,
    noise_png,
    screenshot_png,
)

MODEL = "autoglm-phone-9b"  # served under Open-AutoGLM's model name
CHAT = "/v1/chat/completions"
# Open-AutoGLM's sampling (phone_agent/model/client.py, ModelConfig).
AUTOGLM = {"max_tokens": 3000, "temperature": 0.0, "top_p": 0.85, "frequency_penalty": 0.2}
# The demo model's random text runs to max_tokens: 3000 tokens after the 8,000-token system
# prompt take about 5 s on an idle 2-core CPU, but over 100 s on a busy one. The first request
# asks for 3000 as the agent does; the others have its shape with max_tokens REDUCED.
REDUCED = 128
TASK = "打开微信，给文件传输助手发送消息：你好"
# The assistant turns an agent keeps in its history: "<think>{thinking}</think><answer>{action}
# </answer>". The demo model's random text parses to nothing an agent could act on, so the history
# holds what AutoGLM answers at these steps (a few dozen tokens, as the real model's are).
REPLIES = (
    ("当前在系统桌面，需要先打开微信。", 'do(action="Launch", app="微信")'),
    ("微信已经打开，点击文件传输助手进入聊天。", 'do(action="Tap", element=[500,320])'),
)
PARAM = "messages[1].content[1].image_url"  # the image after a system message and a text part


# ---- servers and helpers --------------------------------------------------------------------


@pytest.fixture(scope="module")
def vl(tmp_path_factory, demo_dir):
    """The demo-vl server most tests share, with --log-prompts (so that every test's log lines
    show what is logged of images, and that the base64 never is), and a request deadline long
    enough for 3000 tokens on a busy CPU."""
    server = start_server(
        tmp_path_factory.mktemp("vl"),
        demo_dir,
        "--served-model-name",
        MODEL,
        "--log-prompts",
        "--request-timeout",
        "600",
        model="demo-vl",
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def text_only(tmp_path_factory, demo_dir):
    """The text-only demo model, with fault injection on."""
    server = start_server(
        tmp_path_factory.mktemp("text"), demo_dir, "--enable-fault-injection", model="demo"
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stalling(tmp_path_factory, demo_dir):
    """demo-vl with a one-second stall timeout that reports and serves on."""
    server = start_server(
        tmp_path_factory.mktemp("stalling"),
        demo_dir,
        "--served-model-name",
        MODEL,
        "--enable-fault-injection",
        "--stall-timeout",
        "1",
        "--on-stall",
        "report",
        "--image-fetch-timeout",
        "30",
        model="demo-vl",
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def demo_vl_dir(demo_dir) -> str:
    from inference.model.demo_vl import ensure_demo_vl_model

    return str(ensure_demo_vl_model(demo_dir))


@pytest.fixture(scope="module")
def traced(tmp_path_factory, demo_dir, demo_vl_dir):
    """An in-process demo-vl server whose spans land in memory, started with a small
    ``max_image_pixels`` (20,000; the shared server keeps the model's own budget)."""
    from test_traces_and_logs import serve_traced

    from inference.config import Config

    config = Config(
        model="demo-vl",
        served_model_name=MODEL,
        demo_dir=demo_dir,
        state_dir=str(tmp_path_factory.mktemp("traced-state")),
        max_image_pixels=20_000,
    )
    with serve_traced(config) as served:
        yield served


def _client(server, timeout: float = 120) -> openai.OpenAI:
    base = server if isinstance(server, str) else server.base_url
    return openai.OpenAI(base_url=base + "/v1", api_key="EMPTY", max_retries=0, timeout=timeout)


def _rid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def _stream(client: openai.OpenAI, messages: list, request_id: str, **extra):
    """Open-AutoGLM's call, read as its client reads it (chunks without choices skipped);
    returns the text, the last finish_reason and the usage chunk's usage, if any."""
    params = {**AUTOGLM, **extra}
    stream = client.chat.completions.create(
        messages=messages,
        model=MODEL,
        stream=True,
        extra_headers={"X-Request-Id": request_id},
        **params,
    )
    text, finish_reason, usage = "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if len(chunk.choices) == 0:
            continue
        if chunk.choices[0].delta.content is not None:
            text += chunk.choices[0].delta.content
        finish_reason = chunk.choices[0].finish_reason or finish_reason
    return text, finish_reason, usage


def _finished_line(server, request_id: str, timeout: float = 30) -> dict:
    """The request's own log line (written as the response ends: waited for)."""
    found: list[dict] = []

    def logged() -> bool:
        found[:] = [
            line
            for line in server.logs()
            if line.get("request_id") == request_id
            and line["message"].startswith(
                ("request finished", "request rejected", "request failed")
            )
        ]
        return bool(found)

    server.wait_for(logged, timeout, f"the log line of {request_id}")
    [line] = found
    return line


def _user(text: str, *urls: str) -> dict:
    return {
        "role": "user",
        "content": [*(image_part(u) for u in urls), {"type": "text", "text": text}],
    }


def _post(server, body: dict, request_id: str | None = None, timeout: float = 120):
    headers = {"X-Request-Id": request_id} if request_id else {}
    return requests.post(server.url(CHAT), json=body, headers=headers, timeout=timeout)


def _small_request(url: str, **extra) -> dict:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": [image_part(url), {"type": "text", "text": "?"}]}],
        "max_tokens": 4,
        "temperature": 0,
        **extra,
    }


def _image_tokens(demo_vl_dir: str, *sizes: tuple[int, int]) -> int:
    """Image tokens the model's own processor makes of images of these (width, height)."""
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(demo_vl_dir, backend="pil")
    merge = processor.merge_size**2
    return sum(processor.get_number_of_image_patches(h, w, {}) // merge for w, h in sizes)


def _sample(server, name: str, **labels: str) -> float:
    try:
        return server.sample(name, **labels)
    except KeyError:  # a histogram or labelled series not written yet
        return 0.0


def _assert_not_logged(server, *urls: str) -> None:
    """No 40-character slice of these data URLs' base64 anywhere in the server's log."""
    log = server.log_path.read_text(encoding="utf-8")
    for url in urls:
        encoded = url.partition(",")[2]
        for start in {0, len(encoded) // 3, len(encoded) // 2, max(0, len(encoded) - 40)}:
            piece = encoded[start : start + 40]
            assert len(piece) < 20 or piece not in log, f"base64 of an image in the log: {piece}"


def _stall_reports(server) -> list[dict]:
    return [line for line in server.logs() if line["message"].startswith("stall report")]


def _health(server) -> requests.Response:
    return requests.get(server.url("/health"), timeout=10)


def _wait_healthy(server, timeout: float = 60) -> None:
    server.wait_for(lambda: _health(server).status_code == 200, timeout, "/health to answer 200")


# ---- 1. Open-AutoGLM ------------------------------------------------------------------------


def test_open_autoglm_request_and_a_three_step_conversation(vl, demo_vl_dir):
    """Open-AutoGLM's exact request (its system prompt's size, a native-resolution PNG
    screenshot as a data URL before the task text, its sampling, max_tokens 3000, streamed)
    through the openai client, to the end; the same with usage asked for; then two more agent
    steps, each earlier screenshot taken out of the history as the agent does."""
    client = _client(vl, timeout=300)
    system = {"role": "system", "content": autoglm_system_prompt()}
    first_text = TASK + '\n\n{"current_app": "System Home"}'
    screens = [
        data_url(screenshot_png(PHONE, colour, label))
        for colour, label in (
            ((30, 120, 200), "Home"),
            ((7, 193, 96), "WeChat"),
            ((7, 160, 80), "Chat"),
        )
    ]
    messages = [system, _user(first_text, screens[0])]
    image_tokens = _image_tokens(demo_vl_dir, PHONE)

    text, finish_reason, usage = _stream(client, messages, "autoglm-step-0")
    assert text and finish_reason in ("stop", "length")
    assert usage is None  # no usage chunk unless asked for
    line = _finished_line(vl, "autoglm-step-0")
    assert line["status"] == 200 and line["finish_reason"] == finish_reason
    assert 0 < line["completion_tokens"] <= 3000
    assert (finish_reason == "length") == (line["completion_tokens"] == 3000)
    assert line["images"] == 1 and line["image_tokens"] == image_tokens
    assert line["prompt_tokens"] > 7000  # the system prompt is in it

    # A second request asks for usage (stream_options include_usage).
    head, finish_reason, usage = _stream(
        client,
        messages,
        "autoglm-usage",
        max_tokens=REDUCED,
        stream_options={"include_usage": True},
    )
    assert head and text.startswith(head)  # greedy: the beginning of the same answer
    assert usage is not None and 0 < usage.completion_tokens <= REDUCED
    assert (finish_reason == "length") == (usage.completion_tokens == REDUCED)
    assert usage.prompt_tokens == line["prompt_tokens"]
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    for step, (thinking, action) in enumerate(REPLIES, 1):
        # The agent's history: the screenshot out of the last user message (a list of just its
        # text part), its answer in, then the next screenshot with the screen info.
        messages[-1]["content"] = [p for p in messages[-1]["content"] if p.get("type") == "text"]
        messages.append(
            {"role": "assistant", "content": f"<think>{thinking}</think><answer>{action}</answer>"}
        )
        messages.append(_user('** Screen Info **\n\n{"current_app": "微信"}', screens[step]))
        request_id = f"autoglm-step-{step}"
        answer, finish_reason, usage = _stream(client, messages, request_id, max_tokens=REDUCED)
        assert answer and finish_reason in ("stop", "length") and usage is None, step
        line = _finished_line(vl, request_id)
        assert line["status"] == 200 and line["images"] == 1  # only the newest screenshot
        assert line["image_tokens"] == image_tokens
    assert [len(m["content"]) for m in messages if m["role"] == "user"] == [1, 1, 2]


# ---- 2. image and text requests in one batch ------------------------------------------------


def test_image_and_text_requests_batch_together_with_the_answers_they_get_alone(vl):
    """Three image requests (different images, different sizes) and three text requests, sent
    at once while a long request decodes: all answered, each the same greedy text as alone, and
    each image request decoded in a batch with others (its log line's batch_size > 1)."""
    client = _client(vl)
    urls = [
        data_url(screenshot_png((540, 1200), (30, 120, 200), "blue")),
        data_url(screenshot_png(PHONE, (200, 40, 40), "red")),
        data_url(screenshot_png((800, 600), (10, 160, 60), "green")),
    ]
    # The same words with each image: only the images tell the answers apart.
    conversations = [[_user("what is on the screen?", url)] for url in urls]
    conversations += [
        [{"role": "user", "content": "text only"}],
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "more text"}],
        [{"role": "user", "content": [{"type": "text", "text": "text parts, no image"}]}],
    ]

    def run(index: int, request_id: str) -> str:
        response = client.chat.completions.create(
            model=MODEL,
            messages=conversations[index],
            max_tokens=24,
            temperature=0,
            extra_body={"ignore_eos": True},
            extra_headers={"X-Request-Id": request_id},
        )
        assert response.usage.completion_tokens == 24
        return response.choices[0].message.content

    alone = [run(i, _rid(f"alone{i}")) for i in range(len(conversations))]
    assert len(set(alone[:3])) == 3, "different images gave the same answer"

    # A long request keeps the batch running while the others arrive, so they all join it.
    anchor = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "keep decoding"}],
        max_tokens=3000,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = iter(anchor)
    next(chunks)
    ids = [_rid(f"together{i % 6}") for i in range(12)]
    try:
        with concurrent.futures.ThreadPoolExecutor(len(ids)) as pool:
            together = list(pool.map(run, [i % 6 for i in range(12)], ids))
        assert vl.sample("inference_requests_running") >= 1  # the long one still decodes
    finally:
        anchor.close()
    assert together == alone * 2
    lines = [_finished_line(vl, request_id) for request_id in ids]
    assert all(line["status"] == 200 for line in lines)
    image_lines = [line for line in lines if line.get("images")]
    assert len(image_lines) == 6
    assert all(line["batch_size"] > 1 for line in image_lines), [
        line["batch_size"] for line in image_lines
    ]
    vl.wait_for(lambda: vl.sample("inference_requests_running") == 0, what="the batch to drain")


# ---- 3. bad images --------------------------------------------------------------------------


def _bad_cases(good_url: str) -> list[tuple[str, dict, str, str | None, str]]:
    """(name, request body, param, code, a phrase of the message) for each bad image."""
    system = {"role": "system", "content": "you read phone screens"}

    def body(*urls: str, role: str = "user") -> dict:
        content = [{"type": "text", "text": "look"}, *(image_part(u) for u in urls)]
        return {
            "model": MODEL,
            "messages": [system, {"role": role, "content": content}],
            "max_tokens": 4,
        }

    truncated = noise_png()
    truncated = truncated[: len(truncated) // 2]
    not_an_image = base64.b64encode(b"just some text, not a picture at all").decode()
    closed = f"http://127.0.0.1:{free_port()}/screen.png"
    second = "messages[1].content[2].image_url"
    return [
        (
            "bad base64",
            body("data:image/png;base64,iVBORw0K@@not-base64@@"),
            PARAM,
            "invalid_base64",
            "base64",
        ),
        (
            "text bytes",
            body("data:image/png;base64," + not_an_image),
            PARAM,
            "invalid_image",
            "not a PNG",
        ),
        ("truncated png", body(data_url(truncated)), PARAM, "invalid_image", "truncated"),
        # Pillow's own bomb check refuses 400 MP (past twice its limit) ...
        (
            "bomb 20000x20000",
            body(data_url(header_bomb_png(20000, 20000))),
            PARAM,
            "image_too_large",
            "too large",
        ),
        # ... and the server's header limit (--max-image-header-pixels, 50 MP) one that Pillow
        # would decode.
        (
            "bomb 8000x7000",
            body(data_url(header_bomb_png(8000, 7000))),
            PARAM,
            "image_too_large",
            "8000x7000",
        ),
        # Three images each under the limit, over --max-request-image-pixels (100 MP) together.
        (
            "too many pixels together",
            body(*[data_url(header_bomb_png(6000, 6000))] * 3),
            "messages[1].content[3].image_url",
            "image_too_large",
            "per request",
        ),
        (
            "second image bad",
            body(good_url, "data:image/png;base64,@@@@"),
            second,
            "invalid_base64",
            "base64",
        ),
        ("11 images", body(*[good_url] * 11), "messages", "too_many_images", "11 images"),
        ("file url", body("file:///etc/passwd"), PARAM, "invalid_image_url", "'file'"),
        ("closed port", body(closed), PARAM, "image_fetch_failed", "connection refused"),
        (
            "no scheme",
            body(base64.b64encode(b"x" * 30).decode()),
            PARAM,
            "invalid_image_url",
            "no scheme",
        ),
        (
            "assistant image",
            body(good_url, role="assistant"),
            "messages[1].content[1]",
            None,
            "user messages",
        ),
    ]


def test_every_bad_image_gets_a_400_naming_it_and_good_requests_go_on(vl):
    good_url = data_url(screenshot_png((540, 1200), (120, 60, 200), "good"))
    cases = _bad_cases(good_url)

    def good() -> requests.Response:
        return _post(vl, _small_request(good_url))

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        concurrent_good = [pool.submit(good) for _ in range(2)]
        bad = {
            name: pool.submit(_post, vl, body, f"bad-image-{index}")
            for index, (name, body, *_) in enumerate(cases)
        }
        answers = {name: future.result() for name, future in bad.items()}
        assert all(f.result().status_code == 200 for f in concurrent_good)
    for name, _body, param, code, phrase in cases:
        response = answers[name]
        assert response.status_code == 400, (name, response.text)
        assert response.headers["content-type"].startswith("application/json"), name
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error", (name, error)
        assert error["param"] == param, (name, error)
        assert error["code"] == code, (name, error)
        assert phrase in error["message"], (name, error)
        assert error["message"].startswith(f"'{param}'") or code == "too_many_images", (name, error)
    assert "root:" not in answers["file url"].text  # nothing of the file, of course
    # Each is logged as rejected, with its code; no image's base64 is.
    for index, (_name, _body, _param, code, _phrase) in enumerate(cases):
        line = _finished_line(vl, f"bad-image-{index}")
        assert line["level"] == "WARNING" and line["status"] == 400
        assert line["error_type"] == (code or "invalid_request_error")
    sent = [
        part["image_url"]["url"]
        for _name, body, *_ in cases
        for part in body["messages"][1]["content"]
        if part["type"] == "image_url"
    ]
    _assert_not_logged(vl, *(url for url in sent if url.startswith("data:")))
    after = good()
    assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 4


# ---- 4. a text-only model -------------------------------------------------------------------


def test_a_text_only_model_refuses_image_parts_and_vision_faults(text_only):
    url = data_url(screenshot_png((540, 1200)))
    body = {
        "model": "demo",
        "messages": [
            {"role": "user", "content": [image_part(url), {"type": "text", "text": "hi"}]}
        ],
        "max_tokens": 4,
    }
    response = _post(text_only, body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert "'demo' is text-only" in error["message"] and error["param"] == "messages[0].content[0]"
    # Text parts alone are fine on a text-only model.
    body["messages"][0]["content"] = [{"type": "text", "text": "hi"}]
    assert _post(text_only, body).status_code == 200
    armed = requests.post(
        text_only.url("/debug/fault"),
        json={"fault": "hang", "stage": "vision", "seconds": 1},
        timeout=10,
    )
    assert armed.status_code == 400
    assert (
        armed.json()["error"]["param"] == "stage" and "vision" in armed.json()["error"]["message"]
    )


# ---- 5. metrics and spans -------------------------------------------------------------------


def test_image_metrics_count_one_request_exactly(vl, demo_vl_dir):
    sizes = (PHONE, (300, 200))
    urls = [data_url(screenshot_png(size, (60, 60, 160))) for size in sizes]
    expected_tokens = _image_tokens(demo_vl_dir, *sizes)
    assert expected_tokens == 112 + 77  # what the demo's processor makes of these sizes
    vl.wait_for(lambda: vl.sample("inference_requests_running") == 0, what="an idle engine")
    names = {
        "images_count": ("inference_request_images_count", {}),
        "images_sum": ("inference_request_images_sum", {}),
        "tokens_count": ("inference_request_image_tokens_count", {}),
        "tokens_sum": ("inference_request_image_tokens_sum", {}),
        "preprocess": ("inference_image_preprocess_duration_seconds_count", {}),
        "encoder": ("inference_vision_encoder_duration_seconds_count", {}),
        "vision_steps": ("inference_engine_steps_total", {"stage": "vision"}),
    }

    def read() -> dict[str, float]:
        return {key: _sample(vl, name, **labels) for key, (name, labels) in names.items()}

    before = read()
    messages = [
        {
            "role": "user",
            "content": [image_part(urls[0]), image_part(urls[1]), {"type": "text", "text": "two"}],
        }
    ]
    body = {"model": MODEL, "messages": messages, "max_tokens": 4, "temperature": 0}
    response = _post(vl, body, "metrics-two-images")
    assert response.status_code == 200
    # The same words without the images: the difference is the image tokens and, per image,
    # its begin and end tokens.
    text_only = {
        **body,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "two"}]}],
    }
    baseline = _post(vl, text_only)
    assert baseline.status_code == 200
    extra = response.json()["usage"]["prompt_tokens"] - baseline.json()["usage"]["prompt_tokens"]
    assert extra == expected_tokens + 2 * len(sizes)
    vl.wait_for(
        lambda: (
            _sample(vl, "inference_engine_steps_total", stage="vision")
            >= before["vision_steps"] + 1
        ),
        what="the vision step to be published",
    )
    after = read()
    delta = {key: after[key] - before[key] for key in names}
    assert delta == {
        "images_count": 1,
        "images_sum": 2,
        "tokens_count": 1,
        "tokens_sum": expected_tokens,
        "preprocess": 1,
        "encoder": 1,
        "vision_steps": 1,  # one pass of the tower for both images; the text request has none
    }
    line = _finished_line(vl, "metrics-two-images")
    assert line["images"] == 2 and line["image_tokens"] == expected_tokens


TRACE_ID = "5bf92f3577b34da6a3ce929d0e0e4737"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def test_an_image_request_has_preprocess_and_vision_encode_spans(traced):
    base, exporter = traced
    exporter.clear()
    urls = [data_url(screenshot_png(PHONE)), data_url(screenshot_png((800, 600), (200, 90, 0)))]
    content = [image_part(urls[0]), {"type": "text", "text": "a"}, image_part(urls[1])]
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 5,
        "temperature": 0,
    }
    response = requests.post(
        base + CHAT, json=body, headers={"traceparent": TRACEPARENT}, timeout=120
    )
    assert response.status_code == 200
    text_body = {**body, "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]}
    baseline = requests.post(base + CHAT, json=text_body, timeout=120).json()["usage"][
        "prompt_tokens"
    ]
    image_tokens = response.json()["usage"]["prompt_tokens"] - baseline - 2 * len(urls)
    spans = [
        s for s in exporter.get_finished_spans() if format(s.context.trace_id, "032x") == TRACE_ID
    ]
    by_name = {span.name: span for span in spans}
    assert sorted(by_name) == sorted(
        [f"chat {MODEL}", "preprocess", "vision encode", "queue wait", "prefill", "decode"]
    )
    assert len(spans) == len(by_name)  # one of each
    root = by_name[f"chat {MODEL}"]
    for name in ("preprocess", "vision encode", "queue wait", "prefill", "decode"):
        child = by_name[name]
        assert child.parent.span_id == root.context.span_id, name
        assert root.start_time <= child.start_time <= child.end_time <= root.end_time, name
    preprocess = by_name["preprocess"]
    assert preprocess.attributes["inference.images"] == 2
    assert preprocess.attributes["inference.image_tokens"] == image_tokens > 0
    assert preprocess.end_time <= by_name["queue wait"].start_time
    assert by_name["queue wait"].end_time <= by_name["prefill"].start_time
    vision = by_name["vision encode"]
    assert by_name["prefill"].start_time <= vision.start_time <= vision.end_time
    assert vision.end_time <= by_name["prefill"].end_time <= by_name["decode"].start_time


# ---- 6. log lines ---------------------------------------------------------------------------


def test_log_lines_have_image_counts_and_sizes_and_never_the_image(vl, demo_vl_dir):
    png = screenshot_png(PHONE, (250, 200, 20), "logged")
    small = screenshot_png((300, 200), (20, 20, 20), "small")
    url, small_url = data_url(png), data_url(small)
    content = [image_part(url), image_part(small_url), {"type": "text", "text": "log this"}]
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4}
    assert _post(vl, body, "logged-images").status_code == 200
    line = _finished_line(vl, "logged-images")
    assert line["images"] == 2
    assert line["image_tokens"] == _image_tokens(demo_vl_dir, PHONE, (300, 200))
    assert line["image_sizes"] == ["1080x2400", "300x200"]  # --log-prompts: sizes, not bytes
    assert line["image_bytes"] == len(png) + len(small)
    assert line["preprocess_s"] >= 0 and line["vision_encode_s"] >= 0
    assert "log this" in line["prompt"] and "<|image|>" in line["prompt"]
    _assert_not_logged(vl, url, small_url)


# ---- 7. /health while an image downloads ----------------------------------------------------


def test_health_answers_while_an_image_is_being_fetched(vl):
    """Preprocessing runs off the event loop: while an image URL trickles in for 5 s,
    /health answers at once, again and again."""
    images = TricklingImageServer(screenshot_png((540, 1200)), seconds=5)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(_post, vl, _small_request(images.url), "slow-fetch")
            assert images.started.wait(30), "the server never fetched the image"
            for _ in range(4):
                health = requests.get(vl.url("/health"), timeout=2.5)
                assert health.status_code == 200 and health.json()["status"] == "ok"
                time.sleep(0.2)
            assert not images.finished.is_set() and not pending.done()  # still downloading
            assert pending.result().status_code == 200  # and the image was fine
    finally:
        images.close()
    assert _finished_line(vl, "slow-fetch")["images"] == 1


# ---- 8, 9. stalls in stage vision (and a slow download, which is none) ------------------


def test_a_hang_in_the_vision_tower_is_a_stall_in_stage_vision(stalling):
    server = stalling
    stalls_before = _sample(server, "inference_engine_stalls_total", stage="vision")
    reports_before = len(_stall_reports(server))
    armed = requests.post(
        server.url("/debug/fault"),
        json={"fault": "hang", "stage": "vision", "seconds": 4},
        timeout=10,
    )
    assert armed.status_code == 200, armed.text
    url = data_url(screenshot_png((540, 1200)))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(_post, server, _small_request(url), "hangs-in-vision")
        server.wait_for(lambda: _health(server).status_code == 503, 30, "/health to answer 503")
        health = _health(server).json()
        assert health["status"] == "stalled" and health["stage"] == "vision", health
        response = pending.result()
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "engine_stalled" and "stalled in vision" in error["message"]
    assert response.headers.get("retry-after")
    assert _sample(server, "inference_engine_stalls_total", stage="vision") == stalls_before + 1
    [report] = _stall_reports(server)[reports_before:]
    assert report["stage"] == "vision" and report["level"] == "ERROR"
    held = {r["request_id"]: r for r in report["requests"]}
    assert held["hangs-in-vision"]["stage"] == "vision"
    # The hang ends (4 s): the engine moves again and serves.
    _wait_healthy(server)
    again = _post(server, _small_request(url), "after-vision-hang")
    assert again.status_code == 200
    line = _finished_line(server, "after-vision-hang")
    assert line["images"] == 1 and "image_sizes" not in line  # no --log-prompts here


def test_a_hang_in_preprocessing_is_a_stall_in_stage_vision(stalling):
    """A request's images stuck in the worker thread (decoding, the processor; a hang injected
    at stage preprocess): the watchdog reports a stall in stage vision naming that request,
    which gets its 503 while the hang lasts; once it ends, the server serves again."""
    server = stalling
    stalls_before = _sample(server, "inference_engine_stalls_total", stage="vision")
    reports_before = len(_stall_reports(server))
    armed = requests.post(
        server.url("/debug/fault"),
        json={"fault": "hang", "stage": "preprocess", "seconds": 5},
        timeout=10,
    )
    assert armed.status_code == 200, armed.text
    url = data_url(screenshot_png((540, 1200), (90, 0, 90)))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(_post, server, _small_request(url), "hangs-in-preprocess")
        server.wait_for(lambda: _health(server).status_code == 503, 30, "/health to answer 503")
        assert _health(server).json()["stage"] == "vision"
        response = pending.result()
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "engine_stalled"
    # Answered while the job still hangs: the watchdog holds the stall until it returns.
    assert _health(server).status_code == 503
    [report] = _stall_reports(server)[reports_before:]
    assert report["stage"] == "vision"
    assert report["preprocessing"]["request_id"] == "hangs-in-preprocess"
    assert "preprocessing the images of request hangs-in-preprocess" in report["message"]
    assert _sample(server, "inference_engine_stalls_total", stage="vision") == stalls_before + 1
    assert _sample(server, "inference_faults_injected_total", fault="hang", stage="preprocess") == 1
    # The engine itself moves: a text request is served meanwhile, another image request is
    # told that preprocessing is stalled.
    if _health(server).status_code == 503:
        text = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        assert _post(server, text, "text-beside-a-stall").status_code == 200
        refused = _post(server, _small_request(url), "image-beside-a-stall")
        assert refused.status_code in (200, 503)  # 200 only if the hang ended just then
        if refused.status_code == 503:
            assert "preprocessing is stalled" in refused.json()["error"]["message"]
    _wait_healthy(server)
    assert _post(server, _small_request(url)).status_code == 200


def test_prefill_and_decode_faults_fire_in_the_language_model(stalling):
    """A vision-language model's tower has as many blocks as its text model (demo-vl) or more
    (Qwen2.5-VL-7B): prefill and decode faults must still fire where those stages run."""
    server = stalling
    _wait_healthy(server)
    text = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    for stage in ("prefill", "decode"):
        armed = requests.post(
            server.url("/debug/fault"), json={"fault": "oom", "stage": stage}, timeout=10
        )
        assert armed.status_code == 200, armed.text
        response = _post(server, text, f"oom-at-{stage}")
        assert response.status_code == 503, (stage, response.text)
        assert response.json()["error"]["code"] == "out_of_memory"
        assert _post(server, text).status_code == 200  # and it serves on


def test_a_slow_image_download_is_not_a_stall(stalling):
    """An image URL that takes 3 s, within --image-fetch-timeout (30 s) but past the stall
    timeout (1 s), and a vision tower that takes half a second on it (a slow step injected,
    below the stall timeout): downloads have their own deadline and are no stall, nor is a
    step shorter than the timeout; the request is served."""
    server = stalling
    _wait_healthy(server)
    stalls_before = _sample(server, "inference_engine_stalls_total")
    reports_before = len(_stall_reports(server))
    armed = requests.post(
        server.url("/debug/fault"),
        json={"fault": "slow", "stage": "vision", "seconds": 0.5},
        timeout=10,
    )
    assert armed.status_code == 200, armed.text
    images = TricklingImageServer(screenshot_png((540, 1200), (0, 90, 90)), seconds=3)
    try:
        response = _post(server, _small_request(images.url), "slow-download")
    finally:
        images.close()
    assert _sample(server, "inference_faults_injected_total", fault="slow", stage="vision") == 1
    assert [r["message"] for r in _stall_reports(server)[reports_before:]] == []
    assert response.status_code == 200, response.text
    assert _sample(server, "inference_engine_stalls_total") == stalls_before


# ---- 10. --max-image-pixels -----------------------------------------------------------------


def test_max_image_pixels_gives_a_screenshot_fewer_tokens(vl, traced):
    """The same request on the shared server (the model's own pixel budget) and on the traced
    one (max_image_pixels 20,000): fewer image tokens, at most 20,000 / (28 x 28) of them."""
    base, _ = traced
    url = data_url(screenshot_png(PHONE))

    def prompt_tokens(base_url: str, with_image: bool) -> int:
        parts = [image_part(url)] if with_image else []
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "x"}]}],
            "max_tokens": 2,
        }
        response = requests.post(base_url + CHAT, json=body, timeout=120)
        assert response.status_code == 200, response.text
        return response.json()["usage"]["prompt_tokens"]

    default = prompt_tokens(vl.base_url, True) - prompt_tokens(vl.base_url, False) - 2
    limited = prompt_tokens(base, True) - prompt_tokens(base, False) - 2
    assert default == 112
    assert 0 < limited < default
    assert limited <= 20_000 // (28 * 28)
