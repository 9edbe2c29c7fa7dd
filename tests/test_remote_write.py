"""Remote write to a central store (docs/long-term-storage.md): compose/prometheus/remote-write.yml
is alerts/prometheus.yml plus `external_labels` and `remote_write`; promtool accepts it with every
rule file; run for real, a Prometheus loading it (addresses moved to the test's ports, nothing
else changed) scrapes a real exporter and inference process and remote-writes to a second real
Prometheus started with --web.enable-remote-write-receiver, standing in for Mimir: the receiver
holds the raw series and the recorded vigil:* series, every one with the `cluster` label, and the
alerts reach Alertmanager with it. Also the Helm values for kube-prometheus-stack users: every key
path they set exists in that chart's values.yaml, or, inside remoteWrite, in the Prometheus
Operator's RemoteWriteSpec of the same chart release."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from conftest import (
    REPO,
    Prometheus,
    free_port,
    start_alertmanager,
    start_exporter,
    start_prometheus,
    start_server,
)

from vigil.stack import moved_addresses, prometheus_config

CONFIG = REPO / "compose" / "prometheus" / "remote-write.yml"
ALERTS = REPO / "alerts"
VALUES = REPO / "kubernetes" / "kube-prometheus-stack" / "values.yaml"
FLEET = REPO / "tests" / "data" / "fake_fleet.json"
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
OURS = ("global.external_labels", "remote_write")  # what the file adds to alerts/prometheus.yml


def _shipped() -> dict[str, Any]:
    return yaml.safe_load(CONFIG.read_text(encoding="utf-8"))


def test_the_config_is_alerts_prometheus_yml_plus_external_labels_and_remote_write():
    config = _shipped()
    base = copy.deepcopy(config)
    del base["global"]["external_labels"], base["remote_write"]
    # What vigil.stack writes for a Prometheus mounted beside alerts/ (compose/prometheus/*.yml).
    assert base == prometheus_config(None, None, ["../alerts/*.rules.yml"]), (
        f"{CONFIG.relative_to(REPO)} must be alerts/prometheus.yml with only {OURS} added"
    )
    assert set(config["global"]["external_labels"]) == {"cluster"}
    (remote,) = config["remote_write"]
    assert remote["url"].endswith("/api/v1/push"), "the shipped example is Mimir's distributor"
    queue = remote["queue_config"]
    # The tuning page's advice: capacity 3 to 10 times max_samples_per_send.
    assert 3 <= queue["capacity"] / queue["max_samples_per_send"] <= 10
    assert "write_relabel_configs" not in remote, "docs/long-term-storage.md says why none"


def _lay_out(directory: Path, config: dict[str, Any]) -> Path:
    """The container's view: <dir>/prometheus/remote-write.yml beside <dir>/alerts/."""
    (directory / "alerts").mkdir(parents=True)
    for rules in ALERTS.glob("*.rules.yml"):
        shutil.copy(rules, directory / "alerts" / rules.name)
    (directory / "prometheus").mkdir()
    path = directory / "prometheus" / "remote-write.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def _promtool_check(path: Path) -> None:
    result = subprocess.run(
        [PROMTOOL, "check", "config", str(path)], capture_output=True, text=True, timeout=120
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    rule_files = len(list(ALERTS.glob("*.rules.yml")))
    assert rule_files and f"SUCCESS: {rule_files} rule files found" in output, output


@pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian package prometheus)"
)
def test_promtool_accepts_the_config_with_every_rule_file(tmp_path):
    _promtool_check(_lay_out(tmp_path, _shipped()))


def _moved(config: dict[str, Any], ports: dict[str, int], receiver: str) -> dict[str, Any]:
    """The shipped configuration with the scrape targets and Alertmanager moved to the test's
    ports and the remote-write URL to the receiver's; every other setting as shipped."""
    moved = copy.deepcopy(config)
    addresses = moved_addresses(ports)
    for job in moved["scrape_configs"]:
        for static in job["static_configs"]:
            static["targets"] = [addresses.get(t, t) for t in static["targets"]]
    for manager in moved["alerting"]["alertmanagers"]:
        for static in manager["static_configs"]:
            static["targets"] = [addresses.get(t, t) for t in static["targets"]]
    moved["remote_write"][0]["url"] = receiver + "/api/v1/write"
    return moved


def _start_prometheus_on(directory: Path, config: Path, port: int) -> Prometheus:
    """A Prometheus on a port chosen beforehand (its configuration scrapes itself there)."""
    log_path = directory / "sender.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={directory / 'sender-tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
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


ALERTMANAGER = """
route: {receiver: none, group_wait: 0s}
receivers: [{name: none}]
"""


def _wait(predicate, what: str, timeout: float = 120.0, logs: tuple[Path, ...] = ()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.5)
    tails = "\n".join(f"--- {p.name}:\n{p.read_text()[-2000:]}" for p in logs if p.exists())
    raise AssertionError(f"timed out waiting for {what}\n{tails}")


@pytest.mark.skipif(
    PROMTOOL is None or PROMETHEUS is None,
    reason="prometheus and promtool are not installed (Debian package prometheus)",
)
def test_raw_and_recorded_series_reach_the_central_store_with_the_cluster_label(tmp_path, demo_dir):
    shipped = _shipped()
    cluster = shipped["global"]["external_labels"]["cluster"]
    started: list[Any] = []
    (tmp_path / "receiver").mkdir()
    try:
        receiver = start_prometheus(
            tmp_path / "receiver",
            "global: {scrape_interval: 10s}\n",
            "--web.enable-remote-write-receiver",
        )
        started.append(receiver)
        alertmanager = start_alertmanager(tmp_path, ALERTMANAGER)
        started.append(alertmanager)
        server = start_server(tmp_path, demo_dir)
        started.append(server)
        exporter = start_exporter(
            tmp_path,
            server.state_dir,
            "--target",
            server.base_url,
            "--gpu-backend",
            "fake",
            "--fake-gpu-fleet",
            str(FLEET),
        )
        started.append(exporter)
        response = requests.post(
            server.url("/v1/completions"),
            json={"model": "demo", "prompt": "hello", "max_tokens": 4},
            timeout=60,
        )
        assert response.status_code == 200, response.text

        sender_port = free_port()
        ports = {
            "exporter": int(exporter.base_url.rsplit(":", 1)[1]),
            "prometheus": sender_port,
            "alertmanager": int(alertmanager.base_url.rsplit(":", 1)[1]),
        }
        config = _lay_out(tmp_path / "etc", _moved(shipped, ports, receiver.base_url))
        _promtool_check(config)
        sender = _start_prometheus_on(tmp_path, config, sender_port)
        started.append(sender)
        logs = (sender.log_path, receiver.log_path)

        # Raw series of every job, and the recorded vocabulary, arrive at the receiver. The
        # shipped intervals stay (10 s scrape and evaluation, 5 s batch deadline).
        def arrived() -> bool:
            jobs = {r["metric"]["job"] for r in receiver.query("count by (job) (up)")}
            recorded = receiver.query('count({__name__=~"vigil:.+"})')
            return jobs >= {"vigil-exporter", "prometheus", "alertmanager"} and bool(recorded)

        _wait(arrived, "raw and recorded series at the receiver", logs=logs)
        for expr in (
            'vigil_gpu_up{job="vigil-exporter"}',
            'inference_requests_total{job="vigil-exporter"}',
            'vigil:engine_requests_running{engine="vigil",model="demo"}',
            'ALERTS{alertname="Watchdog"}',
        ):
            found = _wait(lambda e=expr: receiver.query(e), f"{expr} at the receiver", logs=logs)
            assert all(r["metric"].get("cluster") == cluster for r in found), found
        # Every series the receiver holds carries the external label; locally none does.
        assert receiver.query('count({__name__=~".+", cluster=""})') == []
        assert receiver.value(f'count({{__name__=~".+", cluster="{cluster}"}})') > 100
        assert sender.query('count({__name__=~".+", cluster!=""})') == []

        # The alerts evaluated locally reach Alertmanager with the cluster label too.
        def watchdog() -> list[dict[str, Any]]:
            answer = requests.get(
                alertmanager.base_url + "/api/v2/alerts",
                params={"filter": 'alertname="Watchdog"'},
                timeout=10,
            )
            answer.raise_for_status()
            return answer.json()

        (alert,) = _wait(watchdog, "the Watchdog at Alertmanager", logs=logs)
        assert alert["labels"]["cluster"] == cluster
        # And nothing was dropped on the way (the sender's own remote-storage counters).
        assert sender.value("sum(prometheus_remote_storage_samples_failed_total)") == 0
        assert sender.value("sum(prometheus_remote_storage_samples_dropped_total)") in (0, None)
    finally:
        for part in reversed(started):
            part.stop()


# --- kube-prometheus-stack ------------------------------------------------------------------
# Vendored from prometheus-community/helm-charts at commit
# cf408a290aec489277a94450bb3511432477a53a, chart kube-prometheus-stack 88.5.3 (appVersion
# v0.93.1, the Prometheus Operator): the file charts/kube-prometheus-stack/values.yaml is 207 kB,
# so only the key paths the values file sets are copied here, each with the chart's default.
CHART = "kube-prometheus-stack"
CHART_VERSION = "88.5.3"
CHART_KEYS = {
    "prometheus.prometheusSpec.externalLabels": {},
    "prometheus.prometheusSpec.scrapeInterval": "",
    "prometheus.prometheusSpec.evaluationInterval": "",
    "prometheus.prometheusSpec.ruleSelectorNilUsesHelmValues": True,
    "prometheus.prometheusSpec.ruleSelector": {},
    "prometheus.prometheusSpec.ruleNamespaceSelector": {},
    "prometheus.prometheusSpec.podMonitorSelectorNilUsesHelmValues": True,
    "prometheus.prometheusSpec.podMonitorSelector": {},
    "prometheus.prometheusSpec.podMonitorNamespaceSelector": {},
    "prometheus.prometheusSpec.remoteWrite": [],
    "grafana.sidecar.dashboards.enabled": True,
    "grafana.sidecar.dashboards.label": "grafana_dashboard",
    "grafana.sidecar.dashboards.labelValue": "1",
    "grafana.sidecar.dashboards.searchNamespace": "ALL",
}
# Maps whose keys are the user's (label names).
FREE_MAPS = {"prometheus.prometheusSpec.externalLabels"}
# The Prometheus Operator's RemoteWriteSpec, from the same chart release:
# charts/kube-prometheus-stack/charts/crds/crds/crd-prometheuses.yaml (operator 0.93.1),
# spec.remoteWrite.items.properties, and those of its queueConfig and metadataConfig.
REMOTE_WRITE_SPEC = {
    "authorization", "azureAd", "basicAuth", "bearerToken", "bearerTokenFile", "enableHTTP2",
    "followRedirects", "headers", "messageVersion", "metadataConfig", "name", "noProxy",
    "oauth2", "proxyConnectHeader", "proxyFromEnvironment", "proxyUrl", "queueConfig",
    "remoteTimeout", "roundRobinDNS", "sendExemplars", "sendNativeHistograms", "sigv4",
    "tlsConfig", "url", "writeRelabelConfigs",
}  # fmt: skip
QUEUE_CONFIG = {
    "batchSendDeadline", "capacity", "maxBackoff", "maxRetries", "maxSamplesPerSend",
    "maxShards", "minBackoff", "minShards", "retryOnRateLimit", "sampleAgeLimit",
}  # fmt: skip
METADATA_CONFIG = {"maxSamplesPerSend", "send", "sendInterval"}


def _leaf_paths(node: Any, prefix: str = "") -> list[str]:
    """Dotted paths to every value that is not a non-empty mapping."""
    if isinstance(node, dict) and node and prefix not in FREE_MAPS:
        paths = []
        for key, value in node.items():
            paths += _leaf_paths(value, f"{prefix}.{key}" if prefix else key)
        return paths
    return [prefix]


def _values() -> dict[str, Any]:
    return yaml.safe_load(VALUES.read_text(encoding="utf-8"))


def test_every_key_path_of_the_helm_values_exists_in_the_chart():
    values = _values()
    unknown = [path for path in _leaf_paths(values) if path not in CHART_KEYS]
    assert not unknown, f"not keys of {CHART} {CHART_VERSION} values.yaml: {unknown}"
    spec = values["prometheus"]["prometheusSpec"]
    for index, remote in enumerate(spec["remoteWrite"]):
        where = f"prometheus.prometheusSpec.remoteWrite[{index}]"
        assert set(remote) <= REMOTE_WRITE_SPEC, (where, set(remote) - REMOTE_WRITE_SPEC)
        assert set(remote.get("queueConfig", {})) <= QUEUE_CONFIG, where
        assert set(remote.get("metadataConfig", {})) <= METADATA_CONFIG, where
    # What the values exist for: our PrometheusRule and PodMonitors are selected whatever their
    # labels (the chart's default selects only release=<its release>), the dashboards'
    # ConfigMaps (kubernetes/prometheus-operator/dashboards.yaml) are found by the sidecar.
    assert spec["ruleSelectorNilUsesHelmValues"] is False
    assert spec["podMonitorSelectorNilUsesHelmValues"] is False
    dashboards = yaml.safe_load_all(
        (REPO / "kubernetes" / "prometheus-operator" / "dashboards.yaml").read_text()
    )
    sidecar = values["grafana"]["sidecar"]["dashboards"]
    for config_map in dashboards:
        labels = config_map["metadata"]["labels"]
        assert labels.get(sidecar["label"]) == sidecar["labelValue"], config_map["metadata"]


def test_the_helm_values_say_what_the_compose_config_says():
    """The same cluster label, intervals, queue and store in both places (camelCase there)."""
    spec = _values()["prometheus"]["prometheusSpec"]
    shipped = _shipped()
    assert spec["externalLabels"] == shipped["global"]["external_labels"]
    assert spec["scrapeInterval"] == shipped["global"]["scrape_interval"]
    assert spec["evaluationInterval"] == shipped["global"]["evaluation_interval"]
    (remote,) = spec["remoteWrite"]
    (ours,) = shipped["remote_write"]
    assert remote["url"] == ours["url"] and remote["name"] == ours["name"]

    def camel(name: str) -> str:
        head, *rest = name.split("_")
        return head + "".join(part.capitalize() for part in rest)

    expected = {camel(k): v for k, v in ours["queue_config"].items()}
    expected["retryOnRateLimit"] = expected.pop("retryOnHttp429")
    assert remote["queueConfig"] == expected


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
