"""Background model loading: health at once, readiness only when loaded, failures explained."""

from __future__ import annotations

import http.server
import threading

import requests
from conftest import chat_body


class _StalledHub:
    """A stand-in model hub on loopback that holds every request until released, then
    answers 404: a model load that hangs on the network, as it does behind a dead proxy."""

    def __init__(self):
        release = self.release = threading.Event()
        self.requests = 0
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _hold(self):
                hub.requests += 1
                release.wait(120)
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_HEAD = _hold  # noqa: N815 - the http.server API

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.release.set()
        self.server.shutdown()


def test_health_answers_while_the_model_loads_and_a_failed_load_is_explained(server_factory):
    hub = _StalledHub()
    try:
        server = server_factory(
            model="example-org/stalled-model",
            ready=False,
            env={
                "HF_ENDPOINT": hub.url,
                "HF_HUB_OFFLINE": "0",
                "HF_HUB_ETAG_TIMEOUT": "120",
                "HF_HUB_DOWNLOAD_TIMEOUT": "120",
                "HF_HOME": str(server_factory.tmp / "hf"),
            },
        )
        server.wait_for(lambda: hub.requests > 0, what="the loader to reach the hub")
        assert requests.get(server.url("/health"), timeout=5).status_code == 200
        ready = requests.get(server.url("/ready"), timeout=5)
        assert ready.status_code == 503 and ready.json()["status"] == "loading"
        assert server.sample("inference_model_load_state", state="loading") == 1
        assert server.sample("inference_model_load_started_timestamp_seconds") > 0
        refused = requests.post(
            server.url("/v1/chat/completions"),
            json=chat_body(max_tokens=2) | {"model": "stalled-model"},
            timeout=10,
        )
        assert refused.status_code == 503
        assert "still loading" in refused.json()["error"]["message"]
        assert refused.headers["Retry-After"]
        hub.release.set()  # the hub answers 404: the load fails
        server.wait_for(
            lambda: requests.get(server.url("/ready"), timeout=5).json()["status"] == "failed",
            timeout=120,
            what="the failed state",
        )
    finally:
        hub.close()
    ready = requests.get(server.url("/ready"), timeout=5)
    assert ready.status_code == 503
    assert "example-org/stalled-model" in ready.json()["error"]
    assert server.sample("inference_model_load_state", state="failed") == 1
    assert server.sample("inference_model_load_state", state="loading") == 0
    assert server.sample("inference_model_load_duration_seconds") > 0
    errors = [line for line in server.logs() if line["level"] == "ERROR"]
    assert any("model load failed" in line["message"] for line in errors)
    # Still alive (the supervisor decides), never pretending to serve.
    assert requests.get(server.url("/health"), timeout=5).status_code == 200
    refused = requests.post(
        server.url("/v1/chat/completions"),
        json=chat_body(max_tokens=2) | {"model": "stalled-model"},
        timeout=10,
    )
    assert refused.status_code == 503
    assert "failed to load" in refused.json()["error"]["message"]


def test_missing_model_directory_fails_with_its_cause(server_factory, tmp_path):
    server = server_factory(model=str(tmp_path / "no-such-model"), ready=False)
    server.wait_for(
        lambda: requests.get(server.url("/ready"), timeout=5).json()["status"] == "failed",
        what="the failed state",
    )
    error = requests.get(server.url("/ready"), timeout=5).json()["error"]
    assert "no-such-model" in error


def test_demo_model_is_built_once_and_cached(demo_dir):
    from inference.model.demo import demo_model_path, ensure_demo_model

    path = ensure_demo_model(demo_dir)
    assert path == demo_model_path(demo_dir)
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_demo_model(demo_dir) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert {"config.json", "tokenizer.json", "chat_template.jinja"} <= {
        p.name for p in path.iterdir()
    }


def test_demo_tokenizer_accepts_any_text(demo_dir):
    from transformers import AutoTokenizer

    from inference.model.demo import ensure_demo_model

    tokenizer = AutoTokenizer.from_pretrained(ensure_demo_model(demo_dir))
    for text in [
        "plain",
        "héllo wörld",
        "中文 与 emoji 🎉🚀",
        "\x00\x01\x7f tabs\tand\nlines",
        "<|user|> looks special but is text",
        "a" * 5000,
        " ",
    ]:
        ids = tokenizer(text)["input_ids"]
        assert len(ids) == len(text.encode("utf-8"))
        assert tokenizer.decode(ids) == text
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|user|>\nhi\n<|assistant|>\n"


def test_a_max_model_len_above_the_models_limit_is_refused_at_start(server_factory):
    import requests

    server = server_factory("--max-model-len", "99999", ready=False)
    server.wait_for(
        lambda: requests.get(server.url("/ready"), timeout=5).json().get("state") == "failed",
        120,
        "the load to fail",
    )
    error = requests.get(server.url("/ready"), timeout=5).json()["error"]
    assert "--max-model-len 99999 is above the model's limit of 2048 tokens" in error
    assert "max_position_embeddings" in error
