"""The exporter's HTTP endpoints as served (prometheus_client's server and app behind the
exporter's routes): the text format and OpenMetrics parsed back, gzip, the landing page, 404,
IPv6, and a busy port."""

from __future__ import annotations

import gzip
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from conftest import REPO, Server, start_exporter
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from exporter import __version__
from exporter.http import start_server

FLEET = Path(__file__).parent / "data" / "fake_fleet.json"
# What Prometheus 2.x asks for (scrape_protocols' default).
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
    "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


@pytest.fixture(scope="module")
def exporter(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("exporter")
    started = start_exporter(
        tmp_path, tmp_path / "state", "--gpu-backend", "fake", "--fake-gpu-fleet", str(FLEET)
    )
    # the first GPU poll
    started.wait_for(lambda: "vigil_gpu_up{" in started.metrics_text(), 30, "the GPUs")
    yield started
    started.stop()


def _families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_metrics_in_the_text_format(exporter):
    response = requests.get(
        exporter.url("/metrics"), headers={"Accept-Encoding": "identity"}, timeout=10
    )
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert "Content-Encoding" not in response.headers
    families = _families(response.text)
    assert families["vigil_gpu_up"].type == "gauge"
    assert len(families["vigil_gpu_up"].samples) == 3
    energy = families["vigil_gpu_energy_joules"]
    assert energy.type == "counter"
    assert {s.name for s in energy.samples} == {"vigil_gpu_energy_joules_total"}
    build = families["vigil_exporter_build_info"]
    assert build.type == "gauge" and build.samples[0].labels["version"] == __version__
    assert {
        s.labels["collector"]: s.value for s in families["vigil_exporter_collector_success"].samples
    } == {"inference": 1.0, "processes": 1.0, "gpu": 1.0}
    assert "process_cpu_seconds" in families  # the exporter's own process


def test_openmetrics_when_prometheus_asks_for_it(exporter):
    response = requests.get(
        exporter.url("/metrics"), headers={"Accept": PROMETHEUS_ACCEPT}, timeout=10
    )
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith(
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    )
    assert response.text.endswith("# EOF\n")
    families = {f.name: f for f in openmetrics_families(response.text)}  # the strict parser
    assert families["vigil_exporter_build"].type == "info"
    assert families["vigil_gpu_energy_joules"].type == "counter"
    assert "vigil_gpu_up" in families


def test_gzip_when_accepted(exporter):
    plain = requests.get(
        exporter.url("/metrics"), headers={"Accept-Encoding": "identity"}, timeout=10
    )
    raw = requests.get(
        exporter.url("/metrics"), headers={"Accept-Encoding": "gzip"}, timeout=10, stream=True
    )
    assert raw.status_code == 200 and raw.headers["Content-Encoding"] == "gzip"
    body = raw.raw.read()  # as sent, not decoded by requests
    assert len(body) < len(plain.content) / 4
    assert _families(gzip.decompress(body).decode()).keys() == _families(plain.text).keys()


def test_landing_page_404_and_a_name_filter(exporter):
    landing = requests.get(exporter.url("/"), timeout=10)
    assert landing.status_code == 200
    assert landing.headers["Content-Type"].startswith("text/html")
    assert 'href="/metrics"' in landing.text and __version__ in landing.text
    for path in ("/nope", "/metrics/", "/favicon.ico"):
        missing = requests.get(exporter.url(path), timeout=10)
        assert missing.status_code == 404 and "/metrics" in missing.text, path
    only = requests.get(exporter.url("/metrics"), params={"name[]": "vigil_gpu_up"}, timeout=10)
    assert only.status_code == 200
    assert set(_families(only.text)) == {"vigil_gpu_up"}


def test_a_failing_exposition_is_a_500_and_other_routes_still_answer():
    """The collectors are guarded (a failing one is left out); what still fails is a bug."""

    class Broken:
        def collect(self):
            raise RuntimeError("boom")

    registry = CollectorRegistry()
    registry.register(Broken())
    server = start_server("127.0.0.1", 0, registry)
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        failed = requests.get(base + "/metrics", timeout=10)
        assert failed.status_code == 500 and "exporter's log" in failed.text
        assert requests.get(base + "/", timeout=10).status_code == 200
    finally:
        server.shutdown()
        server.server_close()


def test_a_client_that_sends_nothing_is_dropped_and_others_still_served():
    """An idle or stalled connection does not hold its thread for ever."""
    server = start_server("127.0.0.1", 0, CollectorRegistry(), client_timeout=0.5)
    try:
        with socket.create_connection(("127.0.0.1", server.server_port), timeout=30) as idle:
            assert idle.recv(1) == b""  # closed by the server, not by our own 30 s timeout
        base = f"http://127.0.0.1:{server.server_port}"
        assert requests.get(base + "/metrics", timeout=10).status_code == 200
    finally:
        server.shutdown()
        server.server_close()


def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback (::1) on this machine")
@pytest.mark.parametrize("host", ["::1", "::"])
def test_listens_on_ipv6(tmp_path, host):
    log_path = tmp_path / "exporter.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "exporter",
                "--host",
                host,
                "--port",
                "0",
                "--state-dir",
                str(tmp_path / "state"),
                "--gpu-backend",
                "none",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    exporter = Server(process, log_path, tmp_path / "state")
    try:
        listening = re.compile(r"listening on http://\[" + re.escape(host) + r"\]:(\d+)/metrics")
        exporter.wait_for(lambda: listening.search(log_path.read_text()), 30, "the listening line")
        port = listening.search(log_path.read_text()).group(1)
        response = requests.get(f"http://[::1]:{port}/metrics", timeout=10)
        assert response.status_code == 200
        assert "vigil_exporter_build_info" in _families(response.text)
    finally:
        exporter.stop()


def run_exporter(*args: str) -> subprocess.CompletedProcess:
    """The exporter run to its end (these runs end at once, on an error), no GPU backend."""
    command = [sys.executable, "-m", "exporter", "--gpu-backend", "none", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=REPO)


def test_a_busy_port_ends_it_with_one_line_and_status_2(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = run_exporter(
            "--host", "127.0.0.1", "--port", str(port), "--state-dir", str(tmp_path / "state")
        )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output
    naming = [line for line in output.splitlines() if str(port) in line]
    assert len(naming) == 1, output
    assert f"127.0.0.1:{port}" in naming[0] and "--port" in naming[0]


def test_an_unusable_state_directory_ends_it_with_one_line_and_status_2(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = run_exporter("--port", "0", "--state-dir", str(blocker / "state"))
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output
    assert f"cannot use the state directory {blocker / 'state'}" in output
    assert "--state-dir" in output
