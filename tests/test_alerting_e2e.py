"""End to end, the way a person is told: the real inference process (demo model, fault injection
on), the real exporter, real Prometheus with the shipped rules and real Alertmanager with the
shipped configuration, on loopback with short intervals, and a webhook receiver run by the test.

An injected hang reaches the receiver and then its resolution; an injected OOM reaches it; a
long legitimate generation and an idle period raise no hang notification."""

from __future__ import annotations

import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import yaml
from conftest import (
    WebhookReceiver,
    start_alertmanager,
    start_exporter,
    start_prometheus,
    start_server,
)

from alerts.rules import ALERTS_DIR
from alerts.rules import write as write_rules

HANG_ALERTS = (
    "InferenceEngineStalled",
    "InferenceHeartbeatStale",
    "InferenceBusyWithoutProgress",
    "InferenceEngineNoProgress",
)
# Short windows so that the test takes about two minutes; the shipped defaults are in the files.
TEST_PARAMETERS = {
    "evaluation_interval": "1s",  # each rule group carries it: this Prometheus's cadence
    "stall_window": "15s",
    "hang_for": "3s",
    "engine_hang_for": "3s",
    "engine_pending_window": "5s",
    "heartbeat_max_age": "6",
    "probe_for": "60s",
    "oom_window": "30s",
}


def alertmanager_config(receiver_url: str) -> str:
    """The shipped alertmanager.yml, pointed at the test's receiver, with 1 s grouping."""
    config = yaml.safe_load((ALERTS_DIR / "alertmanager.yml").read_text())
    for receiver in config["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            hook["url"] = receiver_url + "/" + hook["url"].rsplit("/", 1)[1]

    def shorten(route):
        route.update(
            {
                k: "1s"
                for k in ("group_wait", "group_interval")
                if k in route or route is config["route"]
            }
        )
        for child in route.get("routes", []):
            shorten(child)

    shorten(config["route"])
    return yaml.safe_dump(config)


def prometheus_config(rules_dir, exporter_address: str, alertmanager_address: str) -> str:
    return yaml.safe_dump(
        {
            "global": {
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "evaluation_interval": "1s",
            },
            "rule_files": [str(rules_dir / "*.rules.yml")],
            "alerting": {
                "alertmanagers": [{"static_configs": [{"targets": [alertmanager_address]}]}]
            },
            "scrape_configs": [
                {"job_name": "vigil-exporter", "static_configs": [{"targets": [exporter_address]}]}
            ],
        }
    )


def test_hang_and_oom_reach_a_person_and_legitimate_work_does_not(tmp_path, demo_dir):
    rules_dir = write_rules(tmp_path / "rules", TEST_PARAMETERS)
    receiver = WebhookReceiver()
    server = start_server(
        tmp_path,
        demo_dir,
        "--enable-fault-injection",
        "--on-stall",
        "report",
        "--stall-timeout",
        "2",
    )
    exporter = start_exporter(
        tmp_path,
        server.state_dir,
        "--target",
        server.base_url,
        "--gpu-backend",
        "none",
        "--probe-interval",
        "1",
        "--canary-interval",
        "5",
    )
    manager = start_alertmanager(tmp_path, alertmanager_config(receiver.url))
    prometheus = start_prometheus(
        tmp_path,
        prometheus_config(
            rules_dir,
            exporter.base_url.removeprefix("http://"),
            manager.base_url.removeprefix("http://"),
        ),
        # Alerts evaluated before Prometheus has found Alertmanager are dropped and resent after
        # this delay (default 1 m): keep the test's start short.
        "--rules.alert.resend-delay=1s",
    )
    try:
        # The pipeline works: the always-firing Watchdog arrives.
        receiver.wait_for("Watchdog", timeout=60)

        # A long generation that keeps making progress (slowed steps, longer than the stall
        # timeout and the heartbeat threshold in total), then an idle period: no hang alert.
        quiet_from = time.time()
        requests.post(
            server.url("/debug/fault"),
            timeout=10,
            json={"fault": "slow", "stage": "decode", "seconds": 0.1, "steps": 100},
        )
        long = requests.post(
            server.url("/v1/completions"),
            timeout=120,
            json={"model": "demo", "prompt": "a long story", "max_tokens": 110, "min_tokens": 110},
        )
        assert long.status_code == 200 and long.json()["usage"]["completion_tokens"] == 110
        time.sleep(10)  # idle; Prometheus evaluates every second
        for name in HANG_ALERTS:
            assert receiver.alerts(name) == [], f"{name} fired for legitimate work or idleness"
        assert (
            prometheus.value(
                'count(ALERTS{alertname=~"Inference(EngineStalled|'
                'HeartbeatStale|BusyWithoutProgress)"})'
            )
            is None
        )

        # An injected hang: the client gets its 503, a person gets the notification, then the
        # resolution once the engine moves again.
        requests.post(
            server.url("/debug/fault"),
            timeout=10,
            json={"fault": "hang", "stage": "decode", "seconds": 8},
        )
        hang_started = time.time()
        answer: list[requests.Response] = []
        client = threading.Thread(
            target=lambda: answer.append(
                requests.post(
                    server.url("/v1/completions"),
                    timeout=60,
                    json={"model": "demo", "prompt": "hello", "max_tokens": 16},
                )
            )
        )
        client.start()
        fired = receiver.wait_for(
            "InferenceEngineStalled", "firing", timeout=60, after=hang_started
        )
        client.join(30)
        assert answer and answer[0].status_code == 503
        assert answer[0].json()["error"]["code"] == "engine_stalled"
        assert fired["labels"]["severity"] == "critical" and fired["labels"]["model"] == "demo"
        assert "runbook_url" in fired["annotations"]
        assert fired["annotations"]["runbook_url"].endswith("/InferenceEngineStalled.md")
        assert "demo" in fired["annotations"]["summary"]
        print(f"hang notified {fired['received_at'] - hang_started:.1f} s after the hang began")
        resolved = receiver.wait_for(
            "InferenceEngineStalled", "resolved", timeout=90, after=fired["received_at"]
        )
        print(f"resolution notified {resolved['received_at'] - hang_started:.1f} s after it began")
        assert (
            requests.post(
                server.url("/v1/completions"),
                timeout=60,
                json={"model": "demo", "prompt": "after", "max_tokens": 4},
            ).status_code
            == 200
        )

        # An injected out-of-memory error: the notification arrives.
        requests.post(
            server.url("/debug/fault"), timeout=10, json={"fault": "oom", "stage": "decode"}
        )
        oom_started = time.time()
        oom = requests.post(
            server.url("/v1/completions"),
            timeout=60,
            json={"model": "demo", "prompt": "oom", "max_tokens": 8},
        )
        assert oom.status_code == 503 and oom.json()["error"]["code"] == "out_of_memory"
        notice = receiver.wait_for("InferenceOutOfMemory", "firing", timeout=60, after=oom_started)
        assert notice["labels"]["stage"] == "decode" and notice["labels"]["model"] == "demo"
        assert "out-of-memory" in notice["annotations"]["description"]
        # Legitimate work never produced a hang notification before the hang itself.
        early = [
            a
            for name in HANG_ALERTS
            for a in receiver.alerts(name)
            if a["received_at"] < hang_started
        ]
        assert early == [] and quiet_from < hang_started
    finally:
        prometheus.stop()
        manager.stop()
        exporter.stop()
        server.stop()
        receiver.stop()


def test_a_frozen_foreign_engine_reaches_a_person_with_its_stacks(tmp_path, demo_dir):
    """Our own server watched as a foreign engine is (its state directory not shared, Prometheus
    scraping its /metrics in a job of its own): the exporter finds its pid from the port;
    SIGSTOP on it stops every scrape of it, yet the any-engine hang alert reaches the receiver
    through the exporter's view, and the exporter logs the py-spy stacks of the stopped process."""
    if shutil.which("py-spy") is None and not (Path(sys.executable).parent / "py-spy").exists():
        pytest.skip("py-spy is not installed (pip install py-spy)")
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    parameters = {
        **TEST_PARAMETERS,
        "engine_pending_window": "5s",
        "engine_progress_window": "5s",
        "engine_hang_for": "3s",
    }
    write_rules(rules_dir, parameters)
    receiver = WebhookReceiver()
    (tmp_path / "engine").mkdir()
    # The watchdog out of the way (as an engine without one): the bound and the floor, which
    # applies once a step has a prediction.
    server = start_server(
        tmp_path / "engine",
        demo_dir,
        "--enable-fault-injection",
        "--stall-timeout",
        "3600",
        "--stall-floor",
        "3600",
    )
    target = f"vigil={server.base_url}"
    exporter = start_exporter(
        tmp_path,
        tmp_path / "exporter-state",
        *("--target", target, "--gpu-backend", "none", "--canary-interval", "0"),
        *("--probe-interval", "0.5", "--hang-dumps", "--hang-dump-after", "3"),
    )
    manager = start_alertmanager(tmp_path, alertmanager_config(receiver.url))
    config = yaml.safe_load(
        prometheus_config(
            rules_dir,
            exporter.base_url.removeprefix("http://"),
            manager.base_url.removeprefix("http://"),
        )
    )
    config["scrape_configs"].append(
        {"job_name": "vigil", "static_configs": [{"targets": [server.base_url[7:]]}]}
    )
    prometheus = start_prometheus(tmp_path, yaml.safe_dump(config), "--rules.alert.resend-delay=1s")
    pid = str(server.process.pid)
    try:
        receiver.wait_for("Watchdog", timeout=60)
        # A request held mid-decode (the engine hangs in a forward pass), then the whole process
        # frozen: no scrape of it answers any more.
        server.hang_a_request(max_tokens=64)

        def seen(name: str, **labels: str) -> bool:
            try:
                return exporter.sample(name, **labels) >= 1
            except KeyError:
                return False

        exporter.wait_for(
            lambda: seen("vigil_engine_requests_running", engine="vigil", model="demo"),
            30,
            "the request seen running by the exporter",
        )
        exporter.wait_for(
            lambda: seen("vigil_engine_process_info", pid=pid, role="listener"),
            30,
            "the engine's process found from its port",
        )
        frozen_at = time.time()
        server.process.send_signal(signal.SIGSTOP)
        notice = receiver.wait_for(
            "InferenceEngineNoProgress", "firing", timeout=90, after=frozen_at
        )
        assert notice["labels"]["engine"] == "vigil" and notice["labels"]["model"] == "demo"
        assert notice["labels"]["target"] == server.base_url
        assert notice["labels"]["severity"] == "critical"

        def reports() -> list[dict]:
            return [
                line for line in exporter.logs() if line["message"].startswith("engine hang report")
            ]

        exporter.wait_for(lambda: reports() != [], 60, "the engine hang report")
        report = reports()[0]
        assert report["level"] == "ERROR" and report["target"] == server.base_url
        (listener,) = [p for p in report["processes"] if str(p["pid"]) == pid]
        assert "stack" in listener and "engine" in listener["stack"], listener
    finally:
        server.process.send_signal(signal.SIGCONT)
        for part in (prometheus, manager, exporter, server):
            part.stop()
        receiver.stop()
