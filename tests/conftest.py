"""Shared fixtures: the demo model, and real inference servers started as subprocesses."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

REPO = Path(__file__).resolve().parents[1]
# Servers the tests start log every deprecation (py.warnings); Server.stop() fails on one. The
# last entry wins: transformers' own GLM-4.1V processor hands numpy a tensor (not our code).
SERVER_WARNINGS = (
    "default::DeprecationWarning,default::PendingDeprecationWarning,default::FutureWarning,"
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)
_DEPRECATIONS = ("DeprecationWarning", "FutureWarning")
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

    def hang_a_request(self, seconds: float | None = None, max_tokens: int = 16) -> float:
        """Arm a decode hang (the server runs with --enable-fault-injection), send a completion
        that meets it in a background thread, and return when the hang was armed (Unix time)."""
        requests.post(
            self.url("/debug/fault"),
            timeout=10,
            json={"fault": "hang", "stage": "decode", "seconds": seconds},
        ).raise_for_status()
        armed = time.time()
        threading.Thread(
            target=lambda: requests.post(
                self.url("/v1/completions"),
                timeout=600,
                json={"model": "demo", "prompt": "hello", "max_tokens": max_tokens},
            ),
            daemon=True,
        ).start()
        return armed

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
                raise AssertionError(
                    f"server exited with {self.process.returncode} while "
                    f"waiting for {what}:\n{self.log_path.read_text()[-3000:]}"
                )
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
        self.assert_no_deprecations()
        return self.process.returncode

    def assert_no_deprecations(self) -> None:
        """A deprecation the process logged (Python's warnings, as py.warnings log lines)."""
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        found = [
            line[:400]
            for line in text.splitlines()
            if '"py.warnings"' in line and any(kind in line for kind in _DEPRECATIONS)
        ]
        assert not found, "deprecation warnings in " + str(self.log_path) + ":\n" + "\n".join(found)


def start_server(
    tmp_path: Path,
    demo_dir: str,
    *args: str,
    ready: bool = True,
    env: dict[str, str] | None = None,
    model: str = "demo",
) -> Server:
    state_dir = tmp_path / "state"
    log_path = tmp_path / "server.log"
    command = [
        sys.executable,
        "-m",
        "inference",
        "--model",
        model,
        "--demo-dir",
        demo_dir,
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--state-dir",
        str(state_dir),
        *args,
    ]
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("VIGIL_INFERENCE_")}
    child_env["PYTHONWARNINGS"] = SERVER_WARNINGS
    child_env.update(env or {})
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=child_env
        )
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


def start_exporter(tmp_path: Path, state_dir: Path, *args: str) -> Server:
    """The companion exporter as a child process, on a free port (parsed from its log)."""
    log_path = tmp_path / "exporter.log"
    command = [
        sys.executable,
        "-m",
        "exporter",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--state-dir",
        str(state_dir),
        *args,
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIGIL_EXPORTER_")}
    env["PYTHONWARNINGS"] = SERVER_WARNINGS
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    exporter = Server(process, log_path, state_dir)

    def listening() -> bool:
        match = _LISTENING.search(log_path.read_text(errors="replace"))
        if match:
            exporter.base_url = f"http://{match.group(1)}:{match.group(2)}"
        return bool(match)

    exporter.wait_for(listening, 30, "the exporter's listening line")
    return exporter


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Prometheus:
    """A real Prometheus (the Debian package) on loopback, queried through its HTTP API."""

    process: subprocess.Popen
    base_url: str
    log_path: Path

    def query(self, expr: str) -> list[dict[str, Any]]:
        response = requests.get(self.base_url + "/api/v1/query", params={"query": expr}, timeout=10)
        response.raise_for_status()
        return response.json()["data"]["result"]

    def value(self, expr: str) -> float | None:
        """The single value of an instant query, or None when it returns nothing."""
        result = self.query(expr)
        if not result:
            return None
        assert len(result) == 1, f"{expr} returned {len(result)} series: {result}"
        return float(result[0]["value"][1])

    def wait_for(self, expr: str, predicate, timeout: float = 60.0) -> float | None:
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            value = self.value(expr)
            if predicate(value):
                return value
            time.sleep(0.25)
        raise AssertionError(
            f"timed out waiting on {expr} (last value {value}); Prometheus log:\n"
            + self.log_path.read_text()[-2000:]
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_prometheus(tmp_path: Path, config_text: str, *extra: str) -> Prometheus:
    config = tmp_path / "prometheus.yml"
    config.write_text(config_text)
    return launch_prometheus(
        config, tmp_path / "tsdb", free_port(), tmp_path / "prometheus.log", *extra
    )


def launch_prometheus(
    config: Path, tsdb: Path, port: int, log_path: Path, *extra: str
) -> Prometheus:
    """Prometheus with this configuration file on this port (a configuration that scrapes
    Prometheus itself needs the port beforehand), ready to answer."""
    import shutil

    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed (Debian package prometheus)")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tsdb}",
                f"--web.listen-address=127.0.0.1:{port}",
                *extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    prometheus = Prometheus(process, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError("prometheus exited:\n" + log_path.read_text()[-3000:])
        try:
            if requests.get(prometheus.base_url + "/-/ready", timeout=2).status_code == 200:
                return prometheus
        except requests.RequestException:
            pass
        time.sleep(0.2)
    prometheus.stop()
    raise AssertionError("prometheus never became ready:\n" + log_path.read_text()[-3000:])


class WebhookReceiver:
    """Collects Alertmanager's webhook notifications (JSON bodies) on a loopback port."""

    def __init__(self):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.notifications: list[dict[str, Any]] = []  # each with "path" and "received_at"
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                payload = json.loads(body)
                payload["path"], payload["received_at"] = self.path, time.time()
                with receiver._lock:
                    receiver.notifications.append(payload)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def alerts(self, name: str | None = None, status: str | None = None) -> list[dict[str, Any]]:
        """Every alert of every notification so far, with the notification's arrival time."""
        with self._lock:
            found = []
            for note in self.notifications:
                for alert in note["alerts"]:
                    if name not in (None, alert["labels"].get("alertname")):
                        continue
                    if status not in (None, alert["status"]):
                        continue
                    found.append({**alert, "received_at": note["received_at"]})
            return found

    def wait_for(
        self, name: str, status: str = "firing", timeout: float = 90.0, after: float = 0.0
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [a for a in self.alerts(name, status) if a["received_at"] >= after]
            if found:
                return found[0]
            time.sleep(0.2)
        raise AssertionError(
            f"no {status} notification of {name} within {timeout} s; got: "
            f"{[(a['labels']['alertname'], a['status']) for a in self.alerts()]}"
        )

    def stop(self) -> None:
        self.server.shutdown()


def start_alertmanager(tmp_path: Path, config_text: str) -> Prometheus:
    """A real Alertmanager (Debian package prometheus-alertmanager) on loopback, clustering off."""
    import shutil

    binary = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    if binary is None:
        pytest.skip("alertmanager is not installed (Debian package prometheus-alertmanager)")
    directory = tmp_path / "alertmanager"
    (directory / "templates").mkdir(parents=True, exist_ok=True)
    for template in (REPO / "alerts" / "templates").glob("*.tmpl"):
        (directory / "templates" / template.name).write_text(template.read_text())
    config = directory / "alertmanager.yml"
    config.write_text(config_text)
    port = free_port()
    log_path = directory / "alertmanager.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--cluster.listen-address=",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    manager = Prometheus(process, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError("alertmanager exited:\n" + log_path.read_text()[-3000:])
        try:
            if requests.get(manager.base_url + "/-/ready", timeout=2).status_code == 200:
                return manager
        except requests.RequestException:
            pass
        time.sleep(0.2)
    manager.stop()
    raise AssertionError("alertmanager never became ready:\n" + log_path.read_text()[-3000:])
