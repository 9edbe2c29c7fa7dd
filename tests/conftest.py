"""Shared fixtures: the demo model, and real inference servers started as subprocesses."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

REPO = Path(__file__).resolve().parents[1]
_LISTENING = re.compile(r"listening on http://([^:]+):(\d+)")


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> str:
    """A demo model built once per test session (a cache dir may be given to skip the build)."""
    from inference.model.demo import ensure_demo_model

    root = os.environ.get("VIGIL_TEST_DEMO_DIR") or str(tmp_path_factory.mktemp("demo"))
    ensure_demo_model(root)
    return root


@dataclass
class Server:
    process: subprocess.Popen
    log_path: Path
    state_dir: Path
    base_url: str = ""
    _lines: list[dict[str, Any]] = field(default_factory=list)

    def url(self, path: str) -> str:
        return self.base_url + path

    def logs(self) -> list[dict[str, Any]]:
        """Every JSON log line written so far (a non-JSON line fails the test)."""
        lines = []
        for raw in self.log_path.read_text(encoding="utf-8", errors="replace").splitlines():
            if raw.strip():
                lines.append(json.loads(raw))
        return lines

    def metrics_text(self) -> str:
        response = requests.get(self.url("/metrics"), timeout=10)
        response.raise_for_status()
        return response.text

    def sample(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        from prometheus_client.parser import text_string_to_metric_families

        total, found = 0.0, False
        for family in text_string_to_metric_families(self.metrics_text()):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
                    found = True
        if not found:
            raise KeyError(f"no sample {name}{labels}")
        return total

    def wait_for(self, predicate, timeout: float = 30.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode} while "
                                     f"waiting for {what}:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}")

    def wait_ready(self, timeout: float = 120.0) -> None:
        def ready() -> bool:
            try:
                return requests.get(self.url("/ready"), timeout=2).status_code == 200
            except requests.RequestException:
                return False
        self.wait_for(ready, timeout, "readiness")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_server(tmp_path: Path, demo_dir: str, *args: str, ready: bool = True,
                 env: dict[str, str] | None = None, model: str = "demo") -> Server:
    state_dir = tmp_path / "state"
    log_path = tmp_path / "server.log"
    command = [sys.executable, "-m", "inference", "--model", model, "--demo-dir", demo_dir,
               "--host", "127.0.0.1", "--port", "0", "--state-dir", str(state_dir), *args]
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("VIGIL_INFERENCE_")}
    child_env.update(env or {})
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                   env=child_env)
    server = Server(process, log_path, state_dir)

    def listening() -> bool:
        match = _LISTENING.search(log_path.read_text(errors="replace"))
        if match:
            server.base_url = f"http://{match.group(1)}:{match.group(2)}"
        return bool(match)
    server.wait_for(listening, 60, "the listening line")
    if ready:
        server.wait_ready()
    return server


@pytest.fixture
def server_factory(tmp_path, demo_dir):
    """Start servers with extra options; all are stopped at the end of the test."""
    started: list[Server] = []

    def factory(*args: str, **kwargs: Any) -> Server:
        index = len(started)
        directory = tmp_path / f"server{index}"
        directory.mkdir()
        server = start_server(directory, demo_dir, *args, **kwargs)
        started.append(server)
        return server
    factory.tmp = tmp_path
    yield factory
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo_dir):
    """One default server shared by the tests of a module."""
    started = start_server(tmp_path_factory.mktemp("server"), demo_dir)
    yield started
    started.stop()


def chat_body(content: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": "demo", "messages": [{"role": "user", "content": content}], **extra}


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu run only where torch sees a CUDA device."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
