"""Remote write to a central store (docs/long-term-storage.md): compose/prometheus/remote-write.yml
is alerts/prometheus.yml plus `external_labels` and `remote_write`; promtool accepts it with every
rule file; run for real, a Prometheus loading it (addresses moved to the test's ports, nothing
else changed) scrapes a real exporter and inference process and remote-writes to a second real
Prometheus started with --web.enable-remote-write-receiver, standing in for Mimir: the receiver
holds the raw series and the recorded vigil:* series, every one with the `cluster` label, and the
alerts reach Alertmanager with it. Also the Helm values for kube-prometheus-stack users: every key
path they set exists in that chart's values.yaml, or, inside remoteWrite, in the Prometheus
Operator's RemoteWriteSpec of the same chart release; they leave the cluster-wide scrape and
evaluation intervals alone (our PodMonitors and rule groups carry their own); the Alertmanager they
configure selects our AlertmanagerConfig, in its own namespace, where the matcher strategy leaves
it unscoped, and a real Alertmanager running the chart's configuration merged with it as the
Operator does routes our Watchdog to the notifier, the chart's Watchdog only to 'null', and, with
the values' inhibit rules (not the chart's), mutes none of our info alerts."""

from __future__ import annotations

import copy
import re
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
    launch_prometheus,
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
        sender = launch_prometheus(
            config, tmp_path / "sender-tsdb", sender_port, tmp_path / "sender.log"
        )
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
# Its alertmanager.config (lines 553-592 of that values.yaml), verbatim: the base configuration
# the Operator adds the selected AlertmanagerConfigs to.
CHART_ALERTMANAGER_CONFIG = yaml.safe_load("""
global:
  resolve_timeout: 5m
inhibit_rules:
  - source_matchers:
      - 'severity = critical'
    target_matchers:
      - 'severity =~ warning|info'
    equal:
      - 'namespace'
      - 'alertname'
  - source_matchers:
      - 'severity = warning'
    target_matchers:
      - 'severity = info'
    equal:
      - 'namespace'
      - 'alertname'
  - source_matchers:
      - 'alertname = InfoInhibitor'
    target_matchers:
      - 'severity = info'
    equal:
      - 'namespace'
  - target_matchers:
      - 'alertname = InfoInhibitor'
route:
  group_by: ['namespace']
  group_wait: 30s
  group_interval: 5m
  repeat_interval: 12h
  receiver: 'null'
  routes:
  - receiver: 'null'
    matchers:
      - alertname = "Watchdog"
receivers:
- name: 'null'
templates:
- '/etc/alertmanager/config/*.tmpl'
""")
CHART = "kube-prometheus-stack"
CHART_VERSION = "88.5.3"
CHART_KEYS = {
    "prometheus.prometheusSpec.externalLabels": {},
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
    "alertmanager.alertmanagerSpec.alertmanagerConfigSelector": {},
    "alertmanager.alertmanagerSpec.alertmanagerConfigNamespaceSelector": {},
    "alertmanager.alertmanagerSpec.alertmanagerConfigMatcherStrategy": {},
    "alertmanager.config.inhibit_rules": CHART_ALERTMANAGER_CONFIG["inhibit_rules"],
}
# Maps whose keys are the user's (label names) or, below, the Operator's.
FREE_MAPS = {
    "prometheus.prometheusSpec.externalLabels",
    "alertmanager.alertmanagerSpec.alertmanagerConfigMatcherStrategy",
}
# The Operator's AlertmanagerConfigMatcherStrategy (pkg/apis/monitoring/v1/alertmanager_types.go,
# v0.93.0): one field, type, an enum whose default is OnNamespace.
MATCHER_STRATEGY_TYPES = {"OnNamespace", "OnNamespaceExceptForAlertmanagerNamespace", "None"}
AMCONFIG = REPO / "kubernetes" / "prometheus-operator" / "alertmanagerconfig.yaml"
OPERATOR_FOLDER = REPO / "kubernetes" / "prometheus-operator"
# Prometheus' default max_shards (DefaultQueueConfig in config/config.go of prometheus/prometheus
# v3.14.0, the image chart 88.5.3 runs): the values keep it, for a queue that ships the whole
# cluster's series, not only ours.
DEFAULT_MAX_SHARDS = 50
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
    strategy = values["alertmanager"]["alertmanagerSpec"]["alertmanagerConfigMatcherStrategy"]
    assert set(strategy) <= {"type"} and strategy["type"] in MATCHER_STRATEGY_TYPES, strategy


def _release_namespace() -> str:
    """The namespace the values file's helm command installs the chart in (its Alertmanager's)."""
    (namespace,) = re.findall(r"^#\s.*\s-n (\S+)\s", VALUES.read_text(encoding="utf-8"), re.M)
    return namespace


def _our_alertmanagerconfig() -> dict[str, Any]:
    (config,) = yaml.safe_load_all(AMCONFIG.read_text(encoding="utf-8"))
    return config


def _our_alertnames() -> str:
    """The alertname regex our AlertmanagerConfig's route matches (every alert of alerts/)."""
    matchers = _our_alertmanagerconfig()["spec"]["route"]["matchers"]
    (matcher,) = [m for m in matchers if m["name"] == "alertname"]
    assert matcher["matchType"] == "=~", matcher
    return matcher["value"]


def test_the_alertmanager_selects_our_alertmanagerconfig_and_lets_it_see_every_alert():
    """The chart always renders alertmanagerConfigSelector ({} when empty or null) and renders
    alertmanagerConfigNamespaceSelector as given (templates/alertmanager/alertmanager.yaml); the
    Operator reads a nil namespace selector as "the Alertmanager's namespace only" and an empty
    one, like an empty label selector, as everything (pkg/alertmanager/operator.go
    selectAlertmanagerConfigs, metav1.LabelSelectorAsSelector). Ours carries only
    app.kubernetes.io labels and is in the release's namespace, the Alertmanager's, where
    OnNamespaceExceptForAlertmanagerNamespace adds no namespace matcher to it (amcfg.go
    otherNamespaceEnforcer) while other teams' AlertmanagerConfigs keep theirs."""
    spec = _values()["alertmanager"]["alertmanagerSpec"]
    assert spec["alertmanagerConfigSelector"] == {}, "empty: every AlertmanagerConfig"
    assert spec["alertmanagerConfigNamespaceSelector"] == {}, "empty (not null): every namespace"
    # OnNamespace (the default) would add namespace="monitoring" to our route and inhibit rules;
    # the namespace-less alerts (absent(), the fleet's, the Watchdog) would miss the notifier.
    # None would unscope every team's AlertmanagerConfig.
    assert spec["alertmanagerConfigMatcherStrategy"] == {
        "type": "OnNamespaceExceptForAlertmanagerNamespace"
    }
    assert _our_alertmanagerconfig()["metadata"]["namespace"] == _release_namespace()
    alertnames = set(_our_alertnames().split("|"))
    for rules in ALERTS.glob("*.rules.yml"):
        for group in yaml.safe_load(rules.read_text(encoding="utf-8"))["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    assert rule["alert"] in alertnames, (rules.name, rule["alert"])


def test_the_charts_inhibit_rules_are_kept_but_the_info_inhibitor_spares_our_alerts():
    """Helm replaces lists: the values restate the chart's four inhibit rules, changed only in
    the InfoInhibitor rule's targets, which leave out every one of our alerts."""
    rules = _values()["alertmanager"]["config"]["inhibit_rules"]
    expected = copy.deepcopy(CHART_ALERTMANAGER_CONFIG["inhibit_rules"])
    info = expected[2]
    assert info["source_matchers"] == ["alertname = InfoInhibitor"]
    info["target_matchers"].append(f'alertname !~ "{_our_alertnames()}"')
    assert rules == expected, "the chart's rules, InfoInhibitor's targets less our alerts"


def _helm_merge(base: Any, override: Any) -> Any:
    """Helm's coalescing of user values over the chart's: maps merged key by key, anything else
    (lists included) replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = _helm_merge(base[key], value) if key in base else value
        return merged
    return copy.deepcopy(override)


def _matchers(matchers: list[dict[str, str]]) -> list[str]:
    # monitoringv1alpha1.Matcher.String(): name, match type, quoted value.
    return [f'{m["name"]}{m.get("matchType", "=")}"{m["value"]}"' for m in matchers]


def _operator_config(base: dict[str, Any], strategy: str, alertmanager_namespace: str) -> dict:
    """What the Operator (v0.93.0, pkg/alertmanager/amcfg.go) makes of the base configuration
    and our AlertmanagerConfig for an Alertmanager in ``alertmanager_namespace``: receivers named
    <namespace>/<name>/<receiver> (makeNamespacedString), matchers as strings (Matcher.String), a
    namespace matcher added to the top route and both sides of each inhibit rule unless the
    strategy says otherwise (getEnforcer: None adds none, OnNamespaceExceptForAlertmanagerNamespace
    none for an AlertmanagerConfig in the Alertmanager's namespace, otherwise namespaceEnforcer),
    continue: true on the top route (continueToNextRoute), and that route put before the base's
    routes (AddAlertmanagerConfigs)."""
    amconfig = _our_alertmanagerconfig()
    namespace, name = amconfig["metadata"]["namespace"], amconfig["metadata"]["name"]
    unscoped = strategy == "None" or (
        strategy == "OnNamespaceExceptForAlertmanagerNamespace"
        and namespace == alertmanager_namespace
    )
    scope = [] if unscoped else [f'namespace="{namespace}"']
    keys = {"groupBy": "group_by", "groupWait": "group_wait", "groupInterval": "group_interval",
            "repeatInterval": "repeat_interval"}  # fmt: skip

    def route(node: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {keys[k]: v for k, v in node.items() if k in keys}
        if "receiver" in node:
            out["receiver"] = f"{namespace}/{name}/{node['receiver']}"
        out["matchers"] = _matchers(node.get("matchers", []))
        if node.get("routes"):
            out["routes"] = [route(child) for child in node["routes"]]
        return out

    config = copy.deepcopy(base)
    config.pop("templates", None)  # the chart's /etc/alertmanager/config, not here
    spec = amconfig["spec"]
    top = route(spec["route"])
    top["matchers"] += scope
    top["continue"] = True
    config["route"]["routes"] = [top, *config["route"].get("routes", [])]
    for rule in spec.get("inhibitRules", []):
        config["inhibit_rules"].append(
            {
                "source_matchers": _matchers(rule.get("sourceMatch", [])) + scope,
                "target_matchers": _matchers(rule.get("targetMatch", [])) + scope,
                "equal": rule.get("equal", []),
            }
        )
    for receiver in spec["receivers"]:
        config["receivers"].append(
            {
                "name": f"{namespace}/{name}/{receiver['name']}",
                "webhook_configs": [
                    {
                        "url": hook["url"],
                        "send_resolved": hook.get("sendResolved", True),
                        "max_alerts": hook.get("maxAlerts", 0),
                    }
                    for hook in receiver.get("webhookConfigs", [])
                ],
            }
        )
    return config


def _post_and_read(alertmanager: Prometheus, alerts: list[dict[str, str]]) -> dict[str, Any]:
    """Post alerts (firing, an hour to live) and read back each one's receivers and state."""
    now = time.time()
    body = [
        {
            "labels": labels,
            "startsAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 60)),
            "endsAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + 3600)),
        }
        for labels in alerts
    ]
    requests.post(
        alertmanager.base_url + "/api/v2/alerts", json=body, timeout=10
    ).raise_for_status()

    def read() -> dict[str, Any] | None:
        answer = requests.get(alertmanager.base_url + "/api/v2/alerts", timeout=10)
        answer.raise_for_status()
        found = {
            (a["labels"]["alertname"], a["labels"].get("namespace"), a["labels"].get("cause")): a
            for a in answer.json()
        }
        # The inhibitor sees a source once it is in the alert store: wait until it has run.
        if len(found) == len(alerts) and all(
            a["status"]["state"] != "unprocessed" for a in found.values()
        ):
            return found
        return None

    return _wait(read, "the alerts at Alertmanager", timeout=30, logs=(alertmanager.log_path,))


@pytest.mark.parametrize("with_values", [True, False], ids=["our values", "chart defaults"])
def test_a_real_alertmanager_with_the_operators_merge_delivers_our_watchdog(tmp_path, with_values):
    """The chart's configuration (with our values, or as the chart ships it) plus our
    AlertmanagerConfig as the Operator merges them (under the values' matcher strategy, for an
    Alertmanager in the release's namespace), run by a real Alertmanager: our Watchdog reaches
    the notifier's dead man's switch before the chart's Watchdog route ends it at 'null'; the
    chart's own Watchdog (severity none, no cause) reaches 'null' only, not our webhook; with
    the chart's own inhibit rules, the InfoInhibitor (which fires while an info alert fires
    without a warning or critical one in its namespace, here none) mutes our Watchdog and
    GpuPowerCapped; with ours it mutes neither, and still mutes another team's info alert."""
    values = _values()
    base = CHART_ALERTMANAGER_CONFIG
    if with_values:
        base = _helm_merge(base, values["alertmanager"]["config"])
    strategy = values["alertmanager"]["alertmanagerSpec"]["alertmanagerConfigMatcherStrategy"]
    config = _operator_config(base, strategy["type"], _release_namespace())
    # Nothing listens there: the notifications are not the point, where they are routed is.
    silent = f"http://127.0.0.1:{free_port()}"
    for receiver in config["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            hook["url"] = silent + "/" + hook["url"].split("/", 3)[3]
    alertmanager = start_alertmanager(tmp_path, yaml.safe_dump(config, sort_keys=False))
    try:
        cluster = {"cluster": "gpu-cluster-1"}
        ours = {"severity": "info", **cluster}
        found = _post_and_read(
            alertmanager,
            [
                # The chart's InfoInhibitor (defaultRules, general.rules: severity none), one per
                # namespace (none for the Watchdog's) where an info alert fires without a warning
                # or critical one, as for each info alert below.
                *(
                    {"alertname": "InfoInhibitor", "severity": "none", **cluster, **place}
                    for place in ({}, {"namespace": "llm-vigil"}, {"namespace": "team-a"})
                ),
                {"alertname": "Watchdog", "cause": "watchdog", **ours},
                # The chart's Watchdog (templates/prometheus/rules-1.14/general.rules.yaml:
                # vector(1), labels severity none; the cluster external label added).
                {"alertname": "Watchdog", "severity": "none", **cluster},
                {
                    "alertname": "GpuPowerCapped",
                    "cause": "throttle",
                    "namespace": "llm-vigil",
                    **ours,
                },
                {"alertname": "KubeQuotaAlmostFull", "namespace": "team-a", **ours},
            ],
        )
    finally:
        alertmanager.stop()

    def receivers(alert: dict[str, Any]) -> list[str]:
        return [r["name"] for r in alert["receivers"]]

    watchdog = found["Watchdog", None, "watchdog"]
    capped = found["GpuPowerCapped", "llm-vigil", "throttle"]
    prefix = "{namespace}/{name}/".format(**_our_alertmanagerconfig()["metadata"])
    # Ours first (continue: true), then the chart's Watchdog route.
    assert receivers(watchdog) == [prefix + "deadmansswitch", "null"]
    assert receivers(capped) == [prefix + "webhook"]
    # The chart's Watchdog has the name but not a cause: not ours, printed and relayed by nobody.
    assert receivers(found["Watchdog", None, None]) == ["null"]
    other = found["KubeQuotaAlmostFull", "team-a", None]
    assert receivers(other) == ["null"], "another team's alert is not ours"
    assert other["status"]["inhibitedBy"], "the chart's InfoInhibitor still works for others"
    if with_values:
        assert watchdog["status"] == {"state": "active", "silencedBy": [], "inhibitedBy": []}
        assert capped["status"]["inhibitedBy"] == []
    else:
        assert watchdog["status"]["inhibitedBy"], "the chart's InfoInhibitor rule mutes it"
        assert capped["status"]["inhibitedBy"]


def test_the_helm_values_leave_the_clusters_intervals_and_ours_carry_their_own():
    """The chart's global scrapeInterval and evaluationInterval would change every target's and
    every rule group's timing in the cluster: the values leave them unset, and our PodMonitor
    endpoints and PrometheusRule groups carry alerts/prometheus.yml's (the Operator writes a
    PodMonitor endpoint's interval as its job's scrape_interval, promcfg.go
    generatePodMonitorConfig; a PrometheusRule's spec, each RuleGroup's interval with it, is
    marshalled into the rule file, pkg/operator/rules.go; prometheusrule_types.go
    RuleGroup.interval: "how often rules in the group are evaluated")."""
    spec = _values()["prometheus"]["prometheusSpec"]
    assert "scrapeInterval" not in spec and "evaluationInterval" not in spec, spec
    timing = _shipped()["global"]
    monitors = list(yaml.safe_load_all((OPERATOR_FOLDER / "podmonitors.yaml").read_text()))
    assert monitors
    # Each PodMonitor: the endpoint of the shipped 10 s, then the one of the hang series at the
    # fast job's 2 s (alerts/prometheus.yml vigil-exporter-hang).
    (fast,) = [j for j in _shipped()["scrape_configs"] if j["job_name"] == "vigil-exporter-hang"]
    for monitor in monitors:
        endpoints = monitor["spec"]["podMetricsEndpoints"]
        assert [e["interval"] for e in endpoints] == [
            timing["scrape_interval"],
            fast["scrape_interval"],
        ], monitor["metadata"]
    (rule,) = yaml.safe_load_all((OPERATOR_FOLDER / "prometheusrule.yaml").read_text())
    intervals = {group["name"]: group.get("interval") for group in rule["spec"]["groups"]}
    # Every group at the evaluation_interval but the fast hang group, at the fast job's.
    assert intervals.pop("vigil-hangs-fast") == fast["scrape_interval"]
    assert set(intervals.values()) == {timing["evaluation_interval"]}, intervals


def test_the_helm_values_say_what_the_compose_config_says():
    """The same cluster label, queue and store in both places (camelCase there), except the
    queue's maxShards: Prometheus' default in the values, whose queue ships the whole cluster."""
    spec = _values()["prometheus"]["prometheusSpec"]
    shipped = _shipped()
    assert spec["externalLabels"] == shipped["global"]["external_labels"]
    (remote,) = spec["remoteWrite"]
    (ours,) = shipped["remote_write"]
    assert remote["url"] == ours["url"] and remote["name"] == ours["name"]

    def camel(name: str) -> str:
        head, *rest = name.split("_")
        return head + "".join(part.capitalize() for part in rest)

    expected = {camel(k): v for k, v in ours["queue_config"].items()}
    expected["retryOnRateLimit"] = expected.pop("retryOnHttp429")
    expected["maxShards"] = DEFAULT_MAX_SHARDS
    assert remote["queueConfig"] == expected


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
