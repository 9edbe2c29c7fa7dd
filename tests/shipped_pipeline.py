"""The whole alerting pipeline with the shipped configuration files, on loopback: the inference
process (demo model, fault injection on, its default stall options), the exporter watching it,
Prometheus with alerts/prometheus.yml and every alerts/*.rules.yml, Alertmanager with
alerts/alertmanager.yml, and a webhook receiver run here in place of the notifier.

The files are taken as the stack without Docker takes them (vigil.stack's prometheus_config and
alertmanager_config): only the addresses move, from the shipped ports (9400, 9090, 9093, 5001)
to the free ports the parts got here, and the rule files are named by absolute path. Every job,
scrape interval, rule group, evaluation interval, route and group wait stays as shipped.

Used by tests/test_hang_fast_path.py and bench/alert_latency.py (mode ``defaults``).
"""

from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import requests
import yaml
from conftest import (
    Prometheus,
    Server,
    WebhookReceiver,
    free_port,
    start_alertmanager,
    start_exporter,
    start_prometheus,
    start_server,
)

from vigil.stack import ALERTS, DEFAULT_PORTS, alertmanager_config, prometheus_config

# The cause of every hang-typed alert (alerts/hangs.rules.yml): what the quiet cases must not
# raise and the injected hang must.
HANG_CAUSE = "hang"
# How soon Prometheus sends an alert again. Only the always-firing Watchdog (the sign that the
# pipeline works) needs it: sent before Prometheus has found Alertmanager it is dropped, and
# comes back after this delay (vigil.stack.RESEND_DELAY, 25 s, explains). A new alert, such as
# a hang, is sent at the evaluation that finds it whatever the delay.
RESEND_DELAY = "1s"


def shipped_configs(ports: dict[str, int]) -> tuple[dict[str, Any], dict[str, Any]]:
    """alerts/prometheus.yml and alerts/alertmanager.yml with the parts at ``ports`` (names of
    vigil.stack.DEFAULT_PORTS) and the rules by absolute path; the rest as shipped. Fails when
    an address at a shipped default port is left (it would reach whatever listens there)."""
    prometheus = prometheus_config(None, None, [str(ALERTS / "*.rules.yml")], ports)
    manager = alertmanager_config(ports)
    text = yaml.safe_dump([prometheus, manager])
    for name, port in DEFAULT_PORTS.items():
        if ports.get(name, port) != port and re.search(rf":{port}\b", text):
            raise AssertionError(f"an address at the shipped port {port} ({name}) was not moved")
    return prometheus, manager


def log_time(server: Server, prefix: str, after: float = 0.0) -> float | None:
    """Wall time (Unix) of the first JSON log line of ``server`` whose message starts with
    ``prefix``, logged at or after ``after``; None when there is none yet."""
    for raw in server.log_path.read_text(errors="replace").splitlines():
        if not raw.startswith("{"):
            continue
        line = json.loads(raw)
        if line.get("message", "").startswith(prefix):
            at = datetime.fromisoformat(line["timestamp"]).timestamp()
            if at >= after:
                return at
    return None


@dataclass
class Pipeline:
    workdir: Path
    demo_dir: str
    server_port: int
    receiver: WebhookReceiver
    manager: Prometheus
    exporter: Server
    prometheus: Prometheus
    server: Server | None = None
    server_args: tuple[str, ...] = ()

    @property
    def server_url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"

    def start_server(self, ready: bool = True) -> Server:
        """The inference process at the port the exporter watches (its model load observed by
        the pipeline when the rest is already running)."""
        self.server = start_server(
            self.workdir,
            self.demo_dir,
            "--enable-fault-injection",
            "--port",
            str(self.server_port),
            *self.server_args,
            ready=ready,
        )
        return self.server

    def hang_alerts(self, after: float = 0.0, before: float = float("inf")) -> list[dict]:
        """Firing hang-typed alerts (cause="hang") notified at the receiver in [after, before)."""
        return [
            alert
            for alert in self.receiver.alerts(status="firing")
            if alert["labels"].get("cause") == HANG_CAUSE and after <= alert["received_at"] < before
        ]

    def wait_for_hang_alert(self, after: float, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = sorted(self.hang_alerts(after), key=lambda a: a["received_at"])
            if found:
                return found[0]
            if self.server is not None and self.server.process.poll() not in (None, 75):
                break
            time.sleep(0.1)
        raise AssertionError(
            f"no hang-typed notification within {timeout} s; got: "
            f"{[(a['labels']['alertname'], a['status']) for a in self.receiver.alerts()]}\n"
            f"firing in Prometheus: {self.prometheus.query('ALERTS')}"
        )

    def stop(self) -> None:
        for part in (self.prometheus, self.manager, self.exporter, self.server):
            if part is not None:
                part.stop()
        self.receiver.stop()


def _reload_prometheus(prometheus: Prometheus, config_text: str, port: int) -> None:
    """Rewrite Prometheus's configuration (its own address now known) and reload it (SIGHUP)."""
    (prometheus.log_path.parent / "prometheus.yml").write_text(config_text)
    prometheus.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        shown = requests.get(prometheus.base_url + "/api/v1/status/config", timeout=5)
        if f"127.0.0.1:{port}" in shown.json()["data"]["yaml"]:
            return
        time.sleep(0.1)
    raise AssertionError("prometheus did not reload:\n" + prometheus.log_path.read_text()[-2000:])


def start_pipeline(
    workdir: Path,
    demo_dir: str,
    *server_args: str,
    server_first: bool = True,
    adjust_prometheus: Callable[[dict[str, Any]], None] | None = None,
    adjust_alertmanager: Callable[[dict[str, Any]], None] | None = None,
) -> Pipeline:
    """Every part with the shipped files. ``server_first``: the inference process starts (and
    is ready) before the rest; otherwise the caller starts it (Pipeline.start_server) once the
    rest runs, so that its model load happens under watch. ``adjust_prometheus`` and
    ``adjust_alertmanager`` change a configuration in place before it is written (the
    benchmark's short mode; None: the shipped files as they are)."""
    adjust_prometheus = adjust_prometheus or (lambda config: None)
    adjust_alertmanager = adjust_alertmanager or (lambda config: None)
    receiver = WebhookReceiver()
    server_port = free_port()
    started: list[Any] = [receiver]
    try:
        pipeline_server = None
        if server_first:
            pipeline_server = start_server(
                workdir,
                demo_dir,
                "--enable-fault-injection",
                "--port",
                str(server_port),
                *server_args,
            )
            started.append(pipeline_server)
        state_dir = workdir / "state"
        state_dir.mkdir(exist_ok=True)
        exporter = start_exporter(
            workdir,
            state_dir,
            "--target",
            f"http://127.0.0.1:{server_port}",
            "--gpu-backend",
            "none",
        )
        started.append(exporter)
        ports = {
            "inference": server_port,
            "exporter": int(exporter.base_url.rsplit(":", 1)[1]),
            "notifier": int(receiver.url.rsplit(":", 1)[1]),
            "prometheus": free_port(),  # replaced by the real one once Prometheus listens
        }
        _, manager_config = shipped_configs({**ports, "alertmanager": free_port()})
        adjust_alertmanager(manager_config)
        # Alertmanager first (its address goes into Prometheus's configuration).
        manager = start_alertmanager(workdir, yaml.safe_dump(manager_config, sort_keys=False))
        started.append(manager)
        ports["alertmanager"] = int(manager.base_url.rsplit(":", 1)[1])
        config, _ = shipped_configs(ports)
        adjust_prometheus(config)
        prometheus = start_prometheus(
            workdir,
            yaml.safe_dump(config, sort_keys=False),
            f"--rules.alert.resend-delay={RESEND_DELAY}",
        )
        started.append(prometheus)
        ports["prometheus"] = int(prometheus.base_url.rsplit(":", 1)[1])
        config, _ = shipped_configs(ports)
        adjust_prometheus(config)
        _reload_prometheus(prometheus, yaml.safe_dump(config, sort_keys=False), ports["prometheus"])
    except BaseException:
        for part in reversed(started):
            part.stop()
        raise
    return Pipeline(
        workdir=workdir,
        demo_dir=demo_dir,
        server_port=server_port,
        receiver=receiver,
        manager=manager,
        exporter=exporter,
        prometheus=prometheus,
        server=pipeline_server,
        server_args=server_args,
    )
