"""A fleet in one view: several GPU nodes in two clusters, their series labelled as a central
ruler (Mimir, Thanos) sees them (cluster from each Prometheus's external labels; node,
namespace and pod from Kubernetes service discovery). Under promtool: the vigil-fleet recording
rules per node, one bad node (its 8 GPUs failing, its engines hung) raising the node alert
once and for that node only, a healthy fleet raising nothing but the Watchdog, a node that
vanished. Under the real Alertmanager with the shipped alertmanager.yml: the alerts of one bad
node make one notification, the node alert's, and its per-GPU and per-engine alerts are held
back, while another node's and another cluster's alerts arrive."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta

import pytest
import requests
import yaml
from conftest import WebhookReceiver, start_alertmanager
from test_alert_rules import _labels_only_rules, _rule_labels, _run_promtool, needs_promtool
from test_alerting_e2e import alertmanager_config

from alerts.rules import ALERTS_DIR, PARAMETERS, alert_names

GPUS = 8
# (cluster, node) -> the models its vLLM pods serve. Node "gpu-a" exists in both clusters: the
# same name in two clusters is two nodes.
FLEET = {
    ("c1", "gpu-a"): ("glm", "qwen"),
    ("c1", "gpu-b"): ("glm",),
    ("c2", "gpu-a"): ("glm",),
    ("c2", "gpu-b"): ("qwen",),
}
BAD = ("c1", "gpu-a")
STEPS = 20  # minutes of input; the tests evaluate at 10m or 20m


def _labels(**labels: str) -> str:
    return ",".join(f'{k}="{v}"' for k, v in labels.items())


def exporter(cluster: str, node: str) -> str:
    """The labels of the node's exporter (DaemonSet pod, instance = node name)."""
    return _labels(
        cluster=cluster,
        job="vigil-exporter",
        instance=node,
        node=node,
        namespace="vigil",
        pod=f"vigil-exporter-{node}",
    )


def gpu(cluster: str, node: str, index: int) -> str:
    return (
        exporter(cluster, node)
        + ","
        + _labels(gpu=str(index), uuid=f"GPU-{node}-{index}-{cluster}", gpu_name="H100")
    )


def vllm(cluster: str, node: str, model: str) -> str:
    """A vLLM pod scraped directly (vllm/v1/metrics/loggers.py: model_name, engine index)."""
    address = f"10.{1 if cluster == 'c1' else 2}.{node[-1]}.{1 if model == 'glm' else 2}:8000"
    return _labels(
        cluster=cluster,
        job="vllm",
        instance=address,
        node=node,
        namespace="serving",
        pod=f"vllm-{model}-{node}",
        model_name=model,
        engine="0",
    )


def engine_service(model: str) -> str:
    """The exporter's target for a vLLM pod: the node-local Service (kubernetes/overlays/vllm)."""
    return f"http://llm-vigil-vllm-{model}.serving.svc:8000"


def xid_79_alerts(cluster: str, node: str) -> list[dict[str, str]]:
    """The labels of GpuXidError for XID 79 on every GPU of the node (its exporter's place)."""
    return [
        {
            "cluster": cluster,
            "namespace": "vigil",
            "node": node,
            "instance": node,
            "gpu": str(index),
            "uuid": f"GPU-{node}-{index}-{cluster}",
            "gpu_name": "H100",
            "xid": "79",
        }
        for index in range(GPUS)
    ]


def healthy_node(cluster: str, node: str) -> dict[str, str]:
    """Everything an exporter and its node's vLLM pods publish when all is well."""
    at = exporter(cluster, node)
    series = {
        f"up{{{at}}}": f"1x{STEPS}",
        f"vigil_nvml_up{{{at}}}": f"1x{STEPS}",
        f'vigil_exporter_collector_success{{{at},collector="gpu"}}': f"1x{STEPS}",
    }
    for index in range(GPUS):
        g = gpu(cluster, node, index)
        series |= {
            f"vigil_gpu_up{{{g}}}": f"1x{STEPS}",
            f"vigil_gpu_last_read_timestamp_seconds{{{g}}}": f"0+60x{STEPS}",
            # GPU i of each node has (10 + i) of its 80 GB free: the least is 10/80.
            f"vigil_gpu_memory_total_bytes{{{g}}}": f"80e9x{STEPS}",
            f"vigil_gpu_memory_free_bytes{{{g}}}": f"{10 + index}e9x{STEPS}",
            f"vigil_gpu_memory_used_bytes{{{g}}}": f"{70 - index}e9x{STEPS}",
            f'vigil_gpu_clock_event_reason{{{g},reason="sw_power_cap"}}': f"0x{STEPS}",
            f'vigil_gpu_clock_event_reason{{{g},reason="hw_thermal_slowdown"}}': f"0x{STEPS}",
            f'vigil_gpu_ecc_errors_total{{{g},type="uncorrected"}}': f"0x{STEPS}",
            f"vigil_gpu_remapped_rows_pending{{{g}}}": f"0x{STEPS}",
            f"vigil_gpu_remapped_rows_failure{{{g}}}": f"0x{STEPS}",
        }
    for model in FLEET[(cluster, node)]:
        target = f'{at},target="{engine_service(model)}"'
        series |= {
            f'vigil_probe_success{{{target},check="{check}"}}': f"1x{STEPS}"
            for check in ("health", "ready", "canary")
        }
        # No vigil_process_* series: the exporter reaches the vLLM pod through a Service and
        # has no process view of it (exporter/engine_processes.py, is_local).
        series[f'vigil_engine_metrics_up{{{target},engine="vllm"}}'] = f"1x{STEPS}"
        # The exporter reads the engine's /metrics too, through the node-local Service of
        # kubernetes/overlays/vllm (another address than the pod's, which Prometheus scrapes):
        # one engine, which must not be counted or alerted on twice.
        seen = f'{at},target="{engine_service(model)}",engine="vllm",model="{model}"'
        series |= {
            f"vigil_engine_requests_running{{{seen}}}": f"4x{STEPS}",
            f"vigil_engine_requests_waiting{{{seen}}}": f"1x{STEPS}",
            f"vigil_engine_progress_total{{{seen}}}": f"0+600x{STEPS}",
        }
        v = vllm(cluster, node, model)
        series |= {
            f"vllm:num_requests_running{{{v}}}": f"4x{STEPS}",
            f"vllm:num_requests_waiting{{{v}}}": f"1x{STEPS}",
            f"vllm:generation_tokens_total{{{v}}}": f"0+600x{STEPS}",
            f"vllm:kv_cache_usage_perc{{{v}}}": f"0.4x{STEPS}",
            f'vllm:request_success_total{{{v},finished_reason="stop"}}': f"0+30x{STEPS}",
        }
    return series


def healthy_fleet() -> dict[str, str]:
    series: dict[str, str] = {}
    for cluster, node in FLEET:
        series |= healthy_node(cluster, node)
    return series


def bad_fleet() -> dict[str, str]:
    """The fleet with node BAD failing from minute 3: XID 79 (fallen off the bus) on all 8 GPUs,
    4 of them lost; its engines keep their requests and stop generating."""
    series = healthy_fleet()
    cluster, node = BAD
    for index in range(GPUS):
        g = gpu(cluster, node, index)
        series[f'vigil_gpu_xid_errors_total{{{g},xid="79"}}'] = f"0x3 1x{STEPS - 3}"
        if index < 4:
            series[f"vigil_gpu_up{{{g}}}"] = f"1x3 0x{STEPS - 3}"
    for model in FLEET[BAD]:
        series[f"vllm:generation_tokens_total{{{vllm(cluster, node, model)}}}"] = (
            f"0+600x3 1800x{STEPS - 3}"
        )
        at = exporter(cluster, node)
        seen = f'{at},target="{engine_service(model)}",engine="vllm",model="{model}"'
        series[f"vigil_engine_progress_total{{{seen}}}"] = f"0+600x3 1800x{STEPS - 3}"
    return series


def _per_node(record: str, values: dict[tuple[str, str], float]) -> dict:
    return {
        "expr": record,
        "eval_time": "10m",
        "exp_samples": [
            {"labels": f"{record}{{{_labels(cluster=c, node=n)}}}", "value": value}
            for (c, n), value in values.items()
        ],
    }


def _alerts(series: dict[str, str], eval_time: str, expected: dict[str, list[dict]]) -> dict:
    labels = _rule_labels()
    return {
        "interval": "1m",
        "input_series": [{"series": s, "values": v} for s, v in series.items()],
        "alert_rule_test": [
            {
                "eval_time": eval_time,
                "alertname": name,
                "exp_alerts": [{"exp_labels": {**labels[name], **where}} for where in places],
            }
            for name, places in expected.items()
        ],
    }


@needs_promtool
def test_the_fleet_recording_rules_per_node(tmp_path):
    nodes = list(FLEET)
    checks = [
        _per_node("vigil:node_gpus", dict.fromkeys(nodes, GPUS)),
        _per_node("vigil:node_gpus_unhealthy", {n: GPUS if n == BAD else 0 for n in nodes}),
        _per_node("vigil:node_gpu_memory_headroom_ratio", dict.fromkeys(nodes, 10 / 80)),
        _per_node("vigil:node_engines", {n: len(FLEET[n]) for n in nodes}),
        _per_node("vigil:node_engines_hung", {n: len(FLEET[n]) if n == BAD else 0 for n in nodes}),
    ]
    tests = [
        {
            "interval": "1m",
            "input_series": [{"series": s, "values": v} for s, v in bad_fleet().items()],
            "promql_expr_test": checks,
        }
    ]
    _run_promtool(tmp_path, tests, _labels_only_rules(tmp_path))


@needs_promtool
def test_one_bad_node_raises_the_node_alert_once_for_that_node(tmp_path):
    cluster, node = BAD
    expected = {
        "NodeGpusFaulty": [{"cluster": cluster, "node": node}],
        "NodeGpusVanished": [],
        # The per-GPU and per-engine alerts fire too, each with its place (Alertmanager holds
        # them back while the node alert fires: test below).
        "GpuXidError": xid_79_alerts(cluster, node),
        "InferenceEngineNoProgress": [
            {
                "cluster": cluster,
                "namespace": "serving",
                "node": node,
                "instance": f"10.1.{node[-1]}.{1 if model == 'glm' else 2}:8000",
                "model": model,
                "engine": "vllm",
            }
            for model in FLEET[BAD]
        ],
    }
    _run_promtool(tmp_path, [_alerts(bad_fleet(), "10m", expected)], _labels_only_rules(tmp_path))


@needs_promtool
def test_a_healthy_fleet_raises_nothing_but_the_watchdog(tmp_path):
    expected = {name: [] for name in alert_names()}
    expected["Watchdog"] = [{}]
    tests = [_alerts(healthy_fleet(), "20m", expected)]
    checks = [
        _per_node("vigil:node_gpus_unhealthy", dict.fromkeys(FLEET, 0)),
        _per_node("vigil:node_engines_hung", dict.fromkeys(FLEET, 0)),
    ]
    tests.append(
        {
            "interval": "1m",
            "input_series": tests[0]["input_series"],
            "promql_expr_test": checks,
        }
    )
    _run_promtool(tmp_path, tests, _labels_only_rules(tmp_path))


@needs_promtool
def test_a_vanished_node_fires(tmp_path):
    """Node c2/gpu-b dies at minute 5: its exporter's target and every series of it end (a
    staleness marker, as Prometheus writes when a target goes), no up == 0 is ever recorded,
    and VigilExporterDown (absent() over the job) stays quiet while other exporters answer."""
    gone = ("c2", "gpu-b")
    series = healthy_fleet()
    prefixes = [exporter(*gone)] + [vllm(*gone, model) for model in FLEET[gone]]
    for selector in series:
        if any(prefix in selector for prefix in prefixes):
            # Its first six samples as they were, then the marker.
            series[selector] = series[selector].removesuffix(f"x{STEPS}") + "x5 stale"
    expected = {
        "NodeGpusVanished": [{"cluster": gone[0], "node": gone[1]}],
        "NodeGpusFaulty": [],
        "VigilExporterDown": [],
        "GpuLost": [],
    }
    quiet = {name: [] for name in expected}
    _run_promtool(
        tmp_path,
        [
            _alerts(series, "20m", expected),
            # Not yet: gone for less than node_vanished_for (5m).
            _alerts(series, "8m", quiet),
        ],
        _labels_only_rules(tmp_path),
    )


@needs_promtool
def test_throttling_gpus_do_not_make_a_faulty_node(tmp_path):
    """Two GPUs of a node slowed down by heat for an hour: each raises its own
    GpuThermalThrottling, and the node is not faulty (no NodeGpusFaulty, which would hold back
    every alert of the node and ask for a drain)."""
    cluster, node = BAD
    series = healthy_fleet()
    for index in (0, 1):
        g = gpu(cluster, node, index)
        series[f'vigil_gpu_clock_event_reason{{{g},reason="hw_thermal_slowdown"}}'] = f"1x{STEPS}"
    at_gpu = {"cluster": cluster, "namespace": "vigil", "node": node, "instance": node}
    expected = {
        "NodeGpusFaulty": [],
        "GpuThermalThrottling": [
            {**at_gpu, "gpu": str(i), "uuid": f"GPU-{node}-{i}-{cluster}", "gpu_name": "H100"}
            for i in (0, 1)
        ],
    }
    checks = [_per_node("vigil:node_gpus_unhealthy", dict.fromkeys(FLEET, 0))]
    tests = [
        _alerts(series, "20m", expected),
        {
            "interval": "1m",
            "input_series": [{"series": s, "values": v} for s, v in series.items()],
            "promql_expr_test": checks,
        },
    ]
    _run_promtool(tmp_path, tests, _labels_only_rules(tmp_path))


@needs_promtool
def test_the_node_alert_fires_with_the_first_gpu_alerts(tmp_path):
    """The node alert fires with the per-GPU ones, not a ``for`` later: Alertmanager's node
    route waits for it only group_wait (test below). The XID counters appear at minute 3 with
    their first error, as the exporter creates them. Evaluated every evaluation_interval, as
    the groups are, in an order promtool leaves open (like Prometheus' offsets): GpuXidError
    fires at 3m, the node alert by the next evaluation, once the recording rule has run."""
    cluster, node = BAD
    series = bad_fleet()
    for index in range(GPUS):
        g = gpu(cluster, node, index)
        series[f'vigil_gpu_xid_errors_total{{{g},xid="79"}}'] = f"_x3 1x{STEPS - 3}"
    expected = {
        "NodeGpusFaulty": [{"cluster": cluster, "node": node}],
        "GpuXidError": xid_79_alerts(cluster, node),
    }
    quiet = {name: [] for name in expected}
    step = PARAMETERS["evaluation_interval"].default
    _run_promtool(
        tmp_path,
        [
            _alerts(series, f"3m{step}", expected),
            _alerts(series, f"2m{60 - _duration_s(step)}s", quiet),
        ],
        _labels_only_rules(tmp_path),
        evaluation_interval=step,
    )


@needs_promtool
def test_no_live_process_fires_on_the_node_that_runs_ours_only(tmp_path):
    """The vLLM nodes of the fleet and one node running our inference process
    (kubernetes/overlays/inference: the exporter probes it as engine vigil and reads its state
    directory). Its process gone, InferenceNoLiveProcess fires there, with its place, and
    nowhere else."""
    node = ("c2", "gpu-c")
    at = exporter(*node)
    target = f'{at},target="http://llm-vigil-inference.llm-vigil.svc:8000"'
    series = healthy_fleet() | {
        f"up{{{at}}}": f"1x{STEPS}",
        f'vigil_engine_metrics_up{{{target},engine="vigil"}}': f"1x9 0x{STEPS - 9}",
        f'vigil_process_alive{{{at},model="glm",pid="1"}}': "1x9 stale",
    }
    expected = {
        "InferenceNoLiveProcess": [
            {"cluster": node[0], "namespace": "vigil", "node": node[1], "instance": node[1]}
        ]
    }
    _run_promtool(
        tmp_path,
        [
            _alerts(series, "20m", expected),
            _alerts(series, "8m", {"InferenceNoLiveProcess": []}),
        ],
        _labels_only_rules(tmp_path),
    )


# --- Alertmanager ----------------------------------------------------------------------------


def _alert(name: str, severity: str, cause: str, **labels: str) -> dict:
    now = datetime.now(UTC)
    return {
        "labels": {"alertname": name, "severity": severity, "cause": cause, **labels},
        "annotations": {"summary": name},
        "startsAt": now.isoformat().replace("+00:00", "Z"),
        "endsAt": (now + timedelta(hours=1)).isoformat().replace("+00:00", "Z"),
        "generatorURL": "http://127.0.0.1:1/graph",
    }


def _node_alerts(place: dict[str, str]) -> tuple[dict, list[dict]]:
    """The node alert of a node and the per-GPU and per-engine alerts Prometheus sends with it
    (labels as the rules give them, place included)."""
    node = place.get("node", "n1")
    source = _alert("NodeGpusFaulty", "critical", "node", **place)
    targets = [
        _alert(
            name,
            severity,
            cause,
            **place,
            namespace="vigil",
            instance=node,
            gpu=str(index),
            uuid=f"GPU-{node}-{index}",
            gpu_name="H100",
        )
        for index in range(GPUS)
        for name, severity, cause in (
            ("GpuXidError", "critical", "gpu"),
            ("GpuLost", "critical", "gpu_lost"),
        )
    ]
    targets += [
        _alert(
            "InferenceEngineNoProgress",
            "critical",
            "hang",
            **place,
            namespace="serving",
            instance=f"10.1.1.{index}:8000",
            model=model,
            engine="vllm",
        )
        for index, model in enumerate(("glm", "qwen"))
    ]
    return source, targets


def _post(manager, alerts: list[dict]) -> None:
    response = requests.post(manager.base_url + "/api/v2/alerts", json=alerts, timeout=10)
    assert response.status_code == 200, response.text


def _states(manager) -> dict[tuple, dict]:
    """Every alert Alertmanager holds, by its labels: its status (state, inhibitedBy)."""
    response = requests.get(manager.base_url + "/api/v2/alerts", timeout=10)
    response.raise_for_status()
    return {tuple(sorted(a["labels"].items())): a["status"] for a in response.json()}


def _wait(predicate, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"no {what} within {timeout} s")


def _key(alert: dict) -> tuple:
    return tuple(sorted(alert["labels"].items()))


@pytest.fixture
def manager_and_receiver(tmp_path):
    receiver = WebhookReceiver()
    manager = start_alertmanager(tmp_path, alertmanager_config(receiver.url))
    try:
        yield manager, receiver
    finally:
        manager.stop()
        receiver.stop()


def _duration_s(text: str) -> float:
    """Seconds of a Prometheus duration of one unit (10s, 1m)."""
    value, unit = re.fullmatch(r"(\d+)([smh])", text).groups()
    return int(value) * {"s": 1, "m": 60, "h": 3600}[unit]


def _node_route(config: dict) -> dict:
    """The critical branch of alertmanager.yml's route for node and GPU causes."""
    node = next(r for r in config["route"]["routes"] if "node" in r["matchers"][0])
    return next(r for r in node["routes"] if r["matchers"] == ['severity="critical"'])


# The node alert reaches Alertmanager up to two evaluation intervals after the first per-GPU
# alert: its recording rule's group and its own are evaluated at other offsets within the
# interval than the GPU alerts' group (alerts/alertmanager.yml, the node route's comment).
NODE_ALERT_LAG_S = 2 * _duration_s(PARAMETERS["evaluation_interval"].default)


def shipped_config(receiver_url: str) -> str:
    """The shipped alertmanager.yml, timings as they are, pointed at the test's receiver."""
    config = yaml.safe_load((ALERTS_DIR / "alertmanager.yml").read_text())
    for receiver in config["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            hook["url"] = receiver_url + "/" + hook["url"].rsplit("/", 1)[1]
    return yaml.safe_dump(config)


def test_the_node_route_waits_for_the_node_alert():
    config = yaml.safe_load((ALERTS_DIR / "alertmanager.yml").read_text())
    # Its lag, and some seconds to send it.
    assert _duration_s(_node_route(config)["group_wait"]) >= NODE_ALERT_LAG_S + 5


@pytest.fixture
def shipped_manager_and_receiver(tmp_path):
    receiver = WebhookReceiver()
    manager = start_alertmanager(tmp_path, shipped_config(receiver.url))
    try:
        yield manager, receiver
    finally:
        manager.stop()
        receiver.stop()


def test_one_bad_node_makes_one_notification(shipped_manager_and_receiver):
    """The shipped alertmanager.yml, its timings unchanged, and the alerts of one bad node in
    the order Prometheus sends them: the XIDs first (GpuXidError, for 0s), the node alert
    NODE_ALERT_LAG_S later (its recording rule and its group evaluated at other offsets), the
    lost GPUs (GpuLost, for 1m) and the hung engines (minutes without progress) after it. One
    notification for the node, its node alert's; another team's alert of the node (no cause)
    is not held back."""
    manager, receiver = shipped_manager_and_receiver
    bad = {"cluster": "c1", "node": "gpu-a"}
    source, targets = _node_alerts(bad)
    xids = [a for a in targets if a["labels"]["alertname"] == "GpuXidError"]
    later = [a for a in targets if a["labels"]["alertname"] != "GpuXidError"]
    # Another team's alert of the same node, as kube-prometheus-stack sends it: no cause.
    foreign = _alert("KubeNodeNotReady", "warning", "", **bad)
    del foreign["labels"]["cause"]
    # Not held back: a GPU of another node of the same cluster, and the hang alerts of two
    # models on the node of the same name in the other cluster, which do not wait for each
    # other (one notification each).
    _, others = _node_alerts({"cluster": "c1", "node": "gpu-b"})
    elsewhere = [others[0]]
    _, other_cluster = _node_alerts({"cluster": "c2", "node": "gpu-a"})
    elsewhere += [
        a for a in other_cluster if a["labels"]["alertname"] == "InferenceEngineNoProgress"
    ]

    _post(manager, xids + elsewhere)
    time.sleep(NODE_ALERT_LAG_S)
    _post(manager, [source])
    _wait(lambda: _key(source) in _states(manager), "node alert in Alertmanager")
    _post(manager, [*later, foreign])

    # Alertmanager says which it holds back, and why: each target inhibited by the node alert.
    def settled():
        states = _states(manager)
        return len(states) == 2 + len(targets) + len(elsewhere) and states

    states = _wait(settled, "every alert in Alertmanager")
    assert states[_key(source)]["state"] == "active"
    assert states[_key(foreign)]["state"] == "active", states[_key(foreign)]
    fingerprints = {
        a["fingerprint"]
        for a in requests.get(manager.base_url + "/api/v2/alerts", timeout=10).json()
        if a["labels"]["alertname"] == "NodeGpusFaulty"
    }
    for alert in targets:
        status = states[_key(alert)]
        assert status["state"] == "suppressed", (alert["labels"], status)
        assert set(status["inhibitedBy"]) == fingerprints, status
    for alert in elsewhere:
        assert states[_key(alert)]["state"] == "active", alert["labels"]

    # Delivered: the bad node's group (its node alert alone), the other node's GPU group, one
    # notification per model of the other cluster's hang alerts, and the other team's alert.
    def delivered():
        notes = [n for n in receiver.notifications if n["path"] == "/alerts"]
        return len(notes) >= 5 and notes

    notes = _wait(delivered, "five notifications", timeout=90)
    time.sleep(2)  # nothing else follows
    notes = [n for n in receiver.notifications if n["path"] == "/alerts"]
    node_groups = [n for n in notes if n["groupLabels"] == bad]
    assert len(node_groups) == 1, node_groups
    assert [a["labels"]["alertname"] for a in node_groups[0]["alerts"]] == ["NodeGpusFaulty"]
    by_group = {tuple(sorted(n["groupLabels"].items())): n for n in notes}
    assert [
        a["labels"]["uuid"] for a in by_group[(("cluster", "c1"), ("node", "gpu-b"))]["alerts"]
    ] == ["GPU-gpu-b-0"]
    hang_groups = [
        n["groupLabels"]
        for n in notes
        if n["groupLabels"].get("alertname") == "InferenceEngineNoProgress"
    ]
    assert sorted(g["model"] for g in hang_groups) == ["glm", "qwen"]
    assert all(g["cluster"] == "c2" for g in hang_groups)
    # Nothing of the bad node but its node alert, and the other team's, reached the receiver.
    delivered_bad = sorted(
        a["labels"]["alertname"]
        for n in receiver.notifications
        for a in n["alerts"]
        if a["labels"].get("cluster") == "c1" and a["labels"].get("node") == "gpu-a"
    )
    assert delivered_bad == ["KubeNodeNotReady", "NodeGpusFaulty"]
    assert len(notes) == 5, [n["groupLabels"] for n in notes]


def test_on_the_single_node_stack_the_node_alert_holds_back_the_machine_not_the_watchdog(
    manager_and_receiver,
):
    """No alert has cluster or node there: Alertmanager counts the missing labels as equal, so
    the node alert stands for the machine; the Watchdog still reaches the dead man's switch."""
    manager, receiver = manager_and_receiver
    source, targets = _node_alerts({})
    watchdog = _alert("Watchdog", "info", "watchdog")
    _post(manager, [source])
    _wait(lambda: _key(source) in _states(manager), "node alert in Alertmanager")
    _post(manager, [*targets, watchdog])
    states = _wait(
        lambda: len(s := _states(manager)) == len(targets) + 2 and s, "every alert in Alertmanager"
    )
    assert states[_key(watchdog)]["state"] == "active"
    assert all(states[_key(a)]["state"] == "suppressed" for a in targets)
    receiver.wait_for("Watchdog", timeout=60)
    note = _wait(
        lambda: [n for n in receiver.notifications if n["path"] == "/alerts"], "the notification"
    )
    assert [a["labels"]["alertname"] for n in note for a in n["alerts"]] == ["NodeGpusFaulty"]
