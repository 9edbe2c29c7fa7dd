"""The exporter's exposition writer against prometheus_client's, and its HTTP endpoints."""

from __future__ import annotations

import gzip
from pathlib import Path

import requests
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import InfoMetricFamily

from conftest import start_exporter
from exporter.exposition import render

FLEET = Path(__file__).parent / "data" / "fake_fleet.json"


def test_render_matches_prometheus_client_byte_for_byte():
    registry = CollectorRegistry()
    Counter("requests", "Requests.", ["model", "status"], registry=registry).labels(
        "glm", "200").inc(3)
    gauge = Gauge("odd_labels", "Help with a \\ backslash\nand a newline.", ["value"],
                  registry=registry)
    gauge.labels('quote " backslash \\ newline \n end').set(1.5)
    gauge.labels("").set(float("inf"))
    gauge.labels("nan").set(float("nan"))
    Histogram("latency_seconds", "Latency.", ["model"], buckets=(0.1, 1.0, 12345678.0),
              registry=registry).labels("glm").observe(0.5)

    class Info:
        def collect(self):
            info = InfoMetricFamily("build", "Build.", labels=())
            info.add_metric([], {"version": "1.2.3"})
            yield info
    registry.register(Info())
    for _ in range(2):  # the second time from the series cache
        assert render(registry) == generate_latest(registry)


def test_metrics_endpoint_gzip_landing_page_and_404(tmp_path):
    exporter = start_exporter(tmp_path, tmp_path / "state", "--gpu-backend", "fake",
                              "--fake-gpu-fleet", str(FLEET))
    try:
        plain = requests.get(exporter.url("/metrics"), headers={"Accept-Encoding": "identity"},
                             timeout=10)
        assert plain.status_code == 200
        assert plain.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        assert "vigil_gpu_up{" in plain.text
        raw = requests.get(exporter.url("/metrics"), headers={"Accept-Encoding": "gzip"},
                           timeout=10, stream=True)
        assert raw.headers["Content-Encoding"] == "gzip"
        body = gzip.decompress(raw.raw.read())
        assert b"vigil_gpu_up{" in body
        assert requests.get(exporter.url("/"), timeout=10).status_code == 200
        missing = requests.get(exporter.url("/nope"), timeout=10)
        assert missing.status_code == 404 and "/metrics" in missing.text
    finally:
        exporter.stop()
