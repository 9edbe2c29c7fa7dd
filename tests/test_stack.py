"""The stack without Docker (the README's main command): every installed part starts on its
documented port with the repository's files, the inference process comes back after its
watchdog exits, and Ctrl-C stops everything."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parents[1]
PORTS = {"inference": 8000, "exporter": 9400, "prometheus": 9090, "alertmanager": 9093}


def _free(port: int) -> bool:
    with socket.socket() as sock:
        # As servers do: a port whose old connections linger in TIME_WAIT is free to listen on.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _wait(predicate, timeout: float, what: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except requests.RequestException:
            pass
        if process.poll() is not None:
            raise AssertionError(f"the stack exited while waiting for {what}:\n{log.read_text()}")
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}")


def test_stack_starts_restarts_the_inference_process_and_stops_on_ctrl_c(tmp_path, demo_dir):
    busy = [name for name, port in PORTS.items() if not _free(port)]
    if busy:
        pytest.skip(f"the stack's ports are taken here by: {', '.join(busy)}")
    out = tmp_path / "stack.out"
    with open(out, "wb") as log:
        stack = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vigil.stack",
                "--run-dir",
                str(tmp_path / "run"),
                "--",
                "--demo-dir",
                demo_dir,
                "--enable-fault-injection",
                "--stall-timeout",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    try:
        ready = lambda: requests.get("http://127.0.0.1:8000/ready", timeout=2).status_code == 200  # noqa: E731
        _wait(ready, 120, "the inference process", stack, out)
        text = out.read_text()
        for name in ("inference", "exporter"):
            assert f"log: {tmp_path / 'run' / 'logs' / name}.log" in text
        _wait(
            lambda: (
                "vigil_process_alive{"
                in requests.get("http://127.0.0.1:9400/metrics", timeout=2).text
            ),
            30,
            "the exporter",
            stack,
            out,
        )
        if "prometheus " in text.replace("skipped: prometheus", ""):

            def exporter_up() -> bool:
                targets = requests.get("http://127.0.0.1:9090/api/v1/targets", timeout=2).json()
                return any(
                    t["labels"]["job"] == "vigil-exporter" and t["health"] == "up"
                    for t in targets["data"]["activeTargets"]
                )

            _wait(exporter_up, 60, "Prometheus scraping the exporter", stack, out)
        # A hang: the watchdog exits with 75 and the stack brings the process back.
        first_pid = requests.get("http://127.0.0.1:8000/ready", timeout=2).json()
        requests.post(
            "http://127.0.0.1:8000/debug/fault",
            timeout=5,
            json={"fault": "hang", "stage": "decode", "seconds": None},
        )
        requests.post(
            "http://127.0.0.1:8000/v1/completions",
            timeout=30,
            json={"model": "demo", "prompt": "hi", "max_tokens": 4},
        )
        _wait(
            lambda: "inference exited with status 75" in out.read_text(),
            30,
            "the watchdog's exit",
            stack,
            out,
        )
        _wait(ready, 120, "the restarted inference process", stack, out)
        assert first_pid  # the old one answered; the new one answers now
    finally:
        stack.send_signal(signal.SIGINT)
        code = stack.wait(60)
    assert code == 0, out.read_text()[-3000:]
    assert "stopped" in out.read_text()
    for name, port in PORTS.items():
        assert _free(port), f"{name} still listens on {port} after Ctrl-C"
