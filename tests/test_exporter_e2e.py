"""End to end: a real inference process and the exporter, scraped by a real Prometheus, with the
results read back through Prometheus's HTTP API; then the inference process frozen (SIGSTOP)
and killed (SIGKILL)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import requests
from conftest import start_exporter, start_prometheus, start_server
from prometheus_client.parser import text_string_to_metric_families

from tools.metrics_reference import all_metric_names

FLEET = Path(__file__).parent / "data" / "fake_fleet.json"


@pytest.fixture
def stack(tmp_path, demo_dir):
    server = start_server(tmp_path, demo_dir)
    exporter = start_exporter(
        tmp_path,
        server.state_dir,
        "--target",
        server.base_url,
        "--gpu-backend",
        "fake",
        "--fake-gpu-fleet",
        str(FLEET),
        "--gpu-interval",
        "0.5",
        "--probe-interval",
        "0.5",
        "--probe-timeout",
        "1",
        "--canary-interval",
        "1",
    )
    yield server, exporter
    exporter.stop()
    server.process.send_signal(signal.SIGCONT)
    server.stop()


def _complete(server, prompt: str = "hello") -> None:
    response = requests.post(
        server.url("/v1/completions"),
        timeout=60,
        json={"model": "demo", "prompt": prompt, "max_tokens": 4},
    )
    assert response.status_code == 200, response.text


def test_exposition_passes_promtool_is_documented_and_holds_no_private_data(stack):
    server, exporter = stack
    _complete(server, "my secret prompt")
    exporter.wait_for(lambda: 'check="canary"' in exporter.metrics_text(), 30, "a canary")
    text = exporter.metrics_text()
    promtool = shutil.which("promtool")
    if promtool is not None:
        result = subprocess.run(
            [promtool, "check", "metrics"], input=text, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stdout + result.stderr
    names = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    own_process = {n for n in names if n.startswith(("process_", "python_"))}
    assert names - own_process - all_metric_names() == set()
    assert {
        "vigil_process_alive",
        "vigil_gpu_up",
        "vigil_probe_success",
        "inference_requests_total",
        "vigil_exporter_collector_success",
    } <= names
    # The target was not named an engine: recognised from its /metrics as this project's own.
    assert (
        f'vigil_target_info{{engine="vigil",source="recognised",target="{server.base_url}"}} 1.0'
        in text
    )
    # No prompt, command line or environment in any label.
    for secret in ("my secret prompt", "--demo-dir", str(server.state_dir), "PATH="):
        assert secret not in text


def test_prometheus_scrapes_the_exporter_and_sees_a_frozen_then_dead_process(stack, tmp_path):
    server, exporter = stack
    host_port = exporter.base_url.removeprefix("http://")
    prometheus = start_prometheus(
        tmp_path,
        f"""
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: vigil
    static_configs:
      - targets: ["{host_port}"]
""",
    )
    pid = str(server.process.pid)
    try:
        for _ in range(3):
            _complete(server)
        prometheus.wait_for(
            'sum(inference_requests_total{endpoint="completions",status="200"})',
            lambda v: v is not None and v >= 3,
        )
        prometheus.wait_for(f'vigil_process_alive{{pid="{pid}"}}', lambda v: v == 1)
        prometheus.wait_for('vigil_probe_success{check="canary"}', lambda v: v == 1)
        prometheus.wait_for("vigil_probe_canary_empty", lambda v: v == 0)
        assert prometheus.value("count(vigil_gpu_up)") == 3
        assert prometheus.value('vigil_exporter_collector_success{collector="gpu"}') == 1

        # Frozen: the exporter still answers every scrape, the heartbeat ages, the probe fails.
        server.process.send_signal(signal.SIGSTOP)
        prometheus.wait_for(f'vigil_process_state{{pid="{pid}",state="stopped"}}', lambda v: v == 1)
        prometheus.wait_for('vigil_probe_success{check="health"}', lambda v: v == 0)
        prometheus.wait_for('vigil_probe_success{check="canary"}', lambda v: v == 0)
        first = prometheus.wait_for(
            f'vigil_process_heartbeat_age_seconds{{pid="{pid}"}}', lambda v: v is not None and v > 2
        )
        prometheus.wait_for(
            f'vigil_process_heartbeat_age_seconds{{pid="{pid}"}}',
            lambda v: v is not None and v > first + 2,
        )
        assert prometheus.value('up{job="vigil"}') == 1
        assert prometheus.value('min_over_time(up{job="vigil"}[1m])') == 1  # no scrape missed
        # the frozen process's last recorded state is still published
        assert prometheus.value(f'inference_queue_depth{{pid="{pid}"}}') == 0

        # Killed: not alive, counted as an unclean exit, its live gauges gone, totals kept.
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(timeout=30)
        prometheus.wait_for(f'vigil_process_alive{{pid="{pid}"}}', lambda v: v == 0)
        prometheus.wait_for('vigil_process_unclean_exits_total{model="demo"}', lambda v: v == 1)
        prometheus.wait_for(f'inference_queue_depth{{pid="{pid}"}}', lambda v: v is None)
        assert (
            prometheus.value('sum(inference_requests_total{endpoint="completions",status="200"})')
            >= 3
        )
        assert not list((Path(server.state_dir) / "metrics").glob(f"gauge_*_{pid}.db"))
    finally:
        prometheus.stop()


def test_a_stop_by_sigterm_is_a_clean_exit_for_the_exporter(tmp_path, demo_dir):
    """docker stop, a Kubernetes rollout and the stack's stop send SIGTERM: the inference process
    stops gracefully, removes its identity and exits 0, so the exporter counts no unclean exit
    (uvicorn re-raises the signal after its graceful stop, which used to skip the cleanup)."""
    server = start_server(tmp_path, demo_dir)
    pid = server.process.pid
    assert (Path(server.state_dir) / "processes" / f"{pid}.json").exists()
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(30) == 0
    assert not (Path(server.state_dir) / "processes" / f"{pid}.json").exists()
    assert '"stopped"' in server.log_path.read_text()


def test_exporter_serves_without_targets_gpus_or_inference(tmp_path):
    """Default NVML backend on a machine without one, an empty state dir, no target."""
    exporter = start_exporter(tmp_path, tmp_path / "empty-state")
    try:
        text = exporter.metrics_text()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        assert "vigil_nvml_up" in families
        if families["vigil_nvml_up"].samples[0].value == 0:
            assert not [n for n in families if n.startswith("vigil_gpu_") and families[n].samples]
        success = {
            s.labels["collector"]: s.value
            for s in families["vigil_exporter_collector_success"].samples
        }
        assert success == {"inference": 1.0, "processes": 1.0, "gpu": 1.0}
    finally:
        # Two signals in a row (a supervisor and an impatient person): a clean exit all the same.
        exporter.process.send_signal(signal.SIGTERM)
        exporter.process.send_signal(signal.SIGTERM)
        assert exporter.process.wait(20) == 0


def test_exporter_bad_configuration_exits_2(tmp_path):
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "exporter", "--target", "nope"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[1],
        env={**os.environ, "VIGIL_EXPORTER_PORT": "1"},
    )
    assert result.returncode == 2
    assert "--target: 'nope' is not valid" in result.stderr


def test_an_engine_without_a_shared_state_directory_is_found_from_its_port(tmp_path, demo_dir):
    """Our own server, its state directory not shared with the exporter, watched as a foreign
    engine is: the exporter finds the listening process from the target's port, publishes its
    /proc view with the served model, ties its GPU memory (a fake GPU reporting that pid) to the
    model, and sees it stopped (SIGSTOP)."""
    (tmp_path / "engine").mkdir()
    server = start_server(tmp_path / "engine", demo_dir)
    pid = str(server.process.pid)
    fleet = json.loads(FLEET.read_text())
    fleet["gpus"][0]["processes"] = [{"pid": server.process.pid, "used_memory_bytes": 7e9}]
    fleet_path = tmp_path / "fleet.json"
    fleet_path.write_text(json.dumps(fleet))
    exporter = start_exporter(
        tmp_path,
        tmp_path / "exporter-state",  # not the server's: no identity, no metrics files
        "--target",
        f"vigil={server.base_url}",
        "--gpu-backend",
        "fake",
        "--fake-gpu-fleet",
        str(fleet_path),
        "--probe-interval",
        "0.5",
        "--canary-interval",
        "0",
    )
    try:

        def has(line: str) -> bool:
            return line in exporter.metrics_text()

        engine = f'engine="vigil",target="{server.base_url}"'
        exporter.wait_for(
            lambda: (
                has(f"vigil_engine_processes{{{engine}}} 1.0")
                and has(f'vigil_process_alive{{model="demo",pid="{pid}"}} 1.0')
            ),
            30,
            "the engine's process found from its port, with its model",
        )
        info = exporter.sample(
            "vigil_engine_process_info", pid=pid, role="listener", model="demo", engine="vigil"
        )
        assert info == 1.0
        assert exporter.sample("vigil_engine_restarts_total", engine="vigil") == 0.0

        def gpu_memory() -> float | None:
            try:
                return exporter.sample("vigil_gpu_process_memory_used_bytes", pid=pid, model="demo")
            except KeyError:
                return None

        exporter.wait_for(lambda: gpu_memory() == 7e9, 30, "the engine's GPU memory, its model's")
        server.process.send_signal(signal.SIGSTOP)
        exporter.wait_for(
            lambda: has(f'vigil_process_state{{model="demo",pid="{pid}",state="stopped"}} 1.0'),
            30,
            "the stopped engine process",
        )
    finally:
        exporter.stop()
        server.process.send_signal(signal.SIGCONT)
        server.stop()


def test_a_failed_canary_is_tried_again_at_the_next_round(server_factory):
    """The exporter starts before the server listens: its first canary fails, and the next
    probe round tries again instead of waiting a whole canary interval (60 s), so the probe
    alert does not stay pending at every start."""
    from conftest import free_port

    from exporter.probe import TargetProber

    port = free_port()
    prober = TargetProber(f"http://127.0.0.1:{port}", canary_interval=60, canary_model="demo")
    prober.run_once()
    assert not prober.state().results["canary"].success  # nothing listens yet
    server = server_factory("--port", str(port))
    server.wait_ready()
    prober.run_once()
    state = prober.state()
    assert state.results["canary"].success, state.results["canary"].error
    assert state.counts[("canary", "failure")] == 1 and state.counts[("canary", "success")] == 1
    prober.run_once()  # a success waits the canary interval again
    assert prober.state().counts[("canary", "success")] == 1
