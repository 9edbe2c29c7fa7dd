"""The stack without Docker (the README's main command): every installed part starts on its
documented port with the repository's files, the inference process comes back after its
watchdog exits, and Ctrl-C stops everything. With --engine it watches an engine that runs
already: no inference process of its own, the exporter probing the engine, and Prometheus
scraping the engine's /metrics from a configuration written into the run directory."""

from __future__ import annotations

import argparse
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml
from conftest import start_server
from prometheus_client.parser import text_string_to_metric_families

from vigil import stack as vigil_stack

REPO = Path(__file__).resolve().parents[1]
ALERTS = REPO / "alerts"
PORTS = {"inference": 8000, "exporter": 9400, "prometheus": 9090, "alertmanager": 9093}
PROMTOOL = shutil.which("promtool")


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


# --- watching an engine that runs already (--engine, --engine-url) -------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--engine", "vllm"], "--engine vllm needs --engine-url"),
        (["--engine-url", "http://127.0.0.1:8000"], "--engine-url needs --engine"),
        (["--engine", "lmdeploy", "--engine-url", "http://127.0.0.1:8000"], "invalid choice"),
        (["--engine", "vllm", "--engine-url", "127.0.0.1:8000"], "--engine-url '127.0.0.1:8000' "),
        (
            ["--engine", "sglang", "--engine-url", "http://127.0.0.1:30000", "--model", "x"],
            "--model: for our inference process",
        ),
        (
            ["--engine", "tgi", "--engine-url", "http://127.0.0.1:3000", "--", "--port", "1"],
            "arguments after --: for our inference process",
        ),
    ],
)
def test_engine_arguments_are_checked_before_anything_starts(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        vigil_stack.main([*argv, "--run-dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists(), "nothing may be started or written"


@pytest.mark.parametrize(
    "url, address, extra",
    [
        ("http://127.0.0.1:8000", "127.0.0.1:8000", {}),
        ("http://gpu-node:30000/", "gpu-node:30000", {}),
        ("https://vllm.internal", "vllm.internal:443", {"scheme": "https"}),
        ("http://[::1]:8000/engine", "[::1]:8000", {"metrics_path": "/engine/metrics"}),
    ],
)
def test_the_engine_scrape_job_is_named_after_the_engine(url, address, extra):
    job = vigil_stack.engine_scrape_job("vllm", url)
    assert job == {"job_name": "vllm", **extra, "static_configs": [{"targets": [address]}]}


def test_the_plan_for_an_engine_starts_no_inference_and_writes_its_own_prometheus_config(
    tmp_path,
):
    args = argparse.Namespace(
        engine="sglang", engine_url="http://127.0.0.1:30000", model="demo", device="auto"
    )
    parts, missing = vigil_stack.plan(args, tmp_path)
    names = [part.name for part in parts]
    assert "inference" not in names and not any("inference" in line for line in missing)
    (exporter,) = [part for part in parts if part.name == "exporter"]
    target = exporter.command[exporter.command.index("--target") + 1]
    assert target == "sglang=http://127.0.0.1:30000"
    written = tmp_path / "prometheus.yml"
    config = yaml.safe_load(written.read_text(encoding="utf-8"))
    shipped = yaml.safe_load((ALERTS / "prometheus.yml").read_text(encoding="utf-8"))
    assert config["rule_files"] == [str(ALERTS / "*.rules.yml")]
    assert config["scrape_configs"][:-1] == shipped["scrape_configs"]
    assert config["scrape_configs"][-1] == {
        "job_name": "sglang",
        "static_configs": [{"targets": ["127.0.0.1:30000"]}],
    }
    assert {k: v for k, v in config.items() if k not in ("rule_files", "scrape_configs")} == {
        k: v for k, v in shipped.items() if k not in ("rule_files", "scrape_configs")
    }
    if "prometheus" in names:
        (prometheus,) = [part for part in parts if part.name == "prometheus"]
        assert f"--config.file={written}" in prometheus.command
    assert (ALERTS / "prometheus.yml").read_text(encoding="utf-8") == (
        ALERTS / "prometheus.yml"
    ).read_text(encoding="utf-8")


def _promtool_check(config: Path) -> None:
    if PROMTOOL is None:
        return
    result = subprocess.run(
        [PROMTOOL, "check", "config", str(config)], capture_output=True, text=True, timeout=120
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    expected = len(list(ALERTS.glob("*.rules.yml")))
    assert f"SUCCESS: {expected} rule files found" in output, output


def _samples(text: str, name: str) -> list:
    return [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]


def _children(pid: int) -> list[str]:
    """The command lines of a process's children (Linux /proc)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    lines = []
    for child in children:
        try:
            raw = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        lines.append(raw.replace(b"\0", b" ").decode(errors="replace"))
    return lines


def test_the_stack_watches_a_running_engine_instead_of_starting_ours(tmp_path, demo_dir):
    """Our own inference server, started by the test on a free port, is the foreign engine:
    --engine vigil --engine-url URL. The stack starts no inference process, the generated
    Prometheus configuration passes promtool, the exporter probes the engine and finds its
    processes from its port, and Prometheus scrapes the engine as job "vigil"."""
    ports = {name: port for name, port in PORTS.items() if name != "inference"}
    busy = [name for name, port in ports.items() if not _free(port)]
    if busy:
        pytest.skip(f"the stack's ports are taken here by: {', '.join(busy)}")
    (tmp_path / "engine").mkdir()
    engine = start_server(tmp_path / "engine", demo_dir)
    url = engine.base_url
    run = tmp_path / "run"
    out = tmp_path / "stack.out"
    try:
        with open(out, "wb") as log:
            stack = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "vigil.stack",
                    "--engine",
                    "vigil",
                    "--engine-url",
                    url,
                    "--run-dir",
                    str(run),
                    "--stop-after",
                    "120",  # a bound: the test stops it with Ctrl-C once it has seen enough
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )
        try:
            _wait(lambda: "Ctrl-C stops" in out.read_text(), 30, "the stack", stack, out)
            text = out.read_text()
            assert f"watching      vigil at {url} (running already" in text, text
            assert f"{url}/metrics answers with vigil's metrics" in text, text
            assert "  inference " not in text and "skipped: inference" not in text, text
            assert not (run / "logs" / "inference.log").exists()
            assert not [c for c in _children(stack.pid) if " -m inference" in c]

            config_path = run / "prometheus.yml"
            config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
            (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "vigil"]
            assert job["static_configs"] == [{"targets": [url.split("://", 1)[1]]}]
            _promtool_check(config_path)

            def exporter_probes() -> bool:
                text = requests.get("http://127.0.0.1:9400/metrics", timeout=2).text
                health = [
                    s
                    for s in _samples(text, "vigil_probe_success")
                    if s.labels == {"target": url, "check": "health"}
                ]
                info = [
                    s for s in _samples(text, "vigil_target_info") if s.labels.get("target") == url
                ]
                found = [
                    s
                    for s in _samples(text, "vigil_engine_processes")
                    if s.labels.get("target") == url
                ]
                return (
                    [s.value for s in health] == [1.0]
                    and [(s.labels["engine"], s.labels["source"]) for s in info]
                    == [("vigil", "configured")]
                    and bool(found)
                    and found[0].value >= 1
                )

            _wait(exporter_probes, 60, "the exporter probing the engine", stack, out)
            if "prometheus " in text.replace("skipped: prometheus", ""):

                def engine_up() -> bool:
                    result = requests.get(
                        "http://127.0.0.1:9090/api/v1/query",
                        params={"query": 'up{job="vigil"}'},
                        timeout=2,
                    ).json()["data"]["result"]
                    return [r["value"][1] for r in result] == ["1"]

                _wait(engine_up, 60, 'Prometheus scraping the engine as job "vigil"', stack, out)
        finally:
            stack.send_signal(signal.SIGINT)
            code = stack.wait(60)
        assert code == 0, out.read_text()[-3000:]
        assert "stopped" in out.read_text()
        assert engine.process.poll() is None, "the stack must leave the engine it watches alone"
    finally:
        engine.stop()
