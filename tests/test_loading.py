"""Background model loading: health at once, readiness only when loaded, failures explained."""

from __future__ import annotations

import os
import shutil
import threading

import requests

from conftest import chat_body


def test_health_answers_while_the_model_loads_and_a_failed_load_is_explained(
        server_factory, demo_dir, tmp_path):
    # A model directory whose config.json is a FIFO: loading blocks on it until the test writes,
    # so the "loading" state can be watched for as long as needed.
    model_dir = tmp_path / "stuck-model"
    shutil.copytree(next(p for p in __import__("pathlib").Path(demo_dir).iterdir()
                         if p.name.startswith("demo-llama")), model_dir)
    (model_dir / "config.json").unlink()
    os.mkfifo(model_dir / "config.json")
    server = server_factory(model=str(model_dir), ready=False)

    assert requests.get(server.url("/health"), timeout=5).status_code == 200
    ready = requests.get(server.url("/ready"), timeout=5)
    assert ready.status_code == 503 and ready.json()["status"] == "loading"
    assert server.sample("inference_model_load_state", state="loading") == 1
    refused = requests.post(server.url("/v1/chat/completions"),
                            json=chat_body(max_tokens=2) | {"model": "stuck-model"}, timeout=10)
    assert refused.status_code == 503
    assert "still loading" in refused.json()["error"]["message"]
    assert refused.headers["Retry-After"]

    # Unblock the loader with a config that is not JSON: the load fails.
    def write_garbage() -> None:
        with open(model_dir / "config.json", "w") as fifo:
            fifo.write("this is not json")
    writer = threading.Thread(target=write_garbage)
    writer.start()
    server.wait_for(lambda: requests.get(server.url("/ready"), timeout=5).json()["status"]
                    == "failed", what="the failed state")
    writer.join(10)
    ready = requests.get(server.url("/ready"), timeout=5)
    assert ready.status_code == 503
    assert "config" in ready.json()["error"]
    assert server.sample("inference_model_load_state", state="failed") == 1
    assert server.sample("inference_model_load_state", state="loading") == 0
    assert server.sample("inference_model_load_duration_seconds") > 0
    errors = [line for line in server.logs() if line["level"] == "ERROR"]
    assert any("model load failed" in line["message"] for line in errors)
    # Still alive (the supervisor decides), never pretending to serve.
    assert requests.get(server.url("/health"), timeout=5).status_code == 200
    refused = requests.post(server.url("/v1/chat/completions"),
                            json=chat_body(max_tokens=2) | {"model": "stuck-model"}, timeout=10)
    assert refused.status_code == 503
    assert "failed to load" in refused.json()["error"]["message"]


def test_missing_model_directory_fails_with_its_cause(server_factory, tmp_path):
    server = server_factory(model=str(tmp_path / "no-such-model"), ready=False)
    server.wait_for(lambda: requests.get(server.url("/ready"), timeout=5).json()["status"]
                    == "failed", what="the failed state")
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
        p.name for p in path.iterdir()}


def test_demo_tokenizer_accepts_any_text(demo_dir):
    from transformers import AutoTokenizer

    from inference.model.demo import ensure_demo_model

    tokenizer = AutoTokenizer.from_pretrained(ensure_demo_model(demo_dir))
    for text in ["plain", "héllo wörld", "中文 与 emoji 🎉🚀", "\x00\x01\x7f tabs\tand\nlines",
                 "<|user|> looks special but is text", "a" * 5000, " "]:
        ids = tokenizer(text)["input_ids"]
        assert len(ids) == len(text.encode("utf-8"))
        assert tokenizer.decode(ids) == text
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert chat == "<|user|>\nhi\n<|assistant|>\n"
