"""kubernetes/without-operator/ (tools/plain_kubernetes.py): a plain Prometheus gives the targets
exactly the labels the PodMonitors give under the Operator, loads the rules of alerts/ and sends
to an Alertmanager whose configuration is alerts/alertmanager.yml with the notifier's Service.
Read from the committed files (test_generated_files.py checks that they are current).

The meta labels of a discovered pod are those Prometheus' kubernetes_sd_config sets for role pod
(prometheus.io/docs, configuration: kubernetes_sd_config, "pod": one target per declared
container port, __meta_kubernetes_namespace, __meta_kubernetes_pod_name,
__meta_kubernetes_pod_label_<name> and __meta_kubernetes_pod_labelpresent_<name> "with any
unsupported characters converted to an underscore", __meta_kubernetes_pod_container_name,
__meta_kubernetes_pod_container_port_name, __meta_kubernetes_pod_container_port_number,
__meta_kubernetes_pod_phase, __meta_kubernetes_pod_node_name).

Debian's prometheus and promtool are built without Kubernetes discovery (promtool refuses
kubernetes_sd_configs as an unknown field); where that is so, the checks run on a copy whose
kubernetes_sd_configs are replaced by file_sd_configs, after checking each of them by hand.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from test_operator_resources import POD_META, _compose_engine_jobs, _scraped_labels

from alerts import rules
from tools import operator_resources, plain_kubernetes

REPO = Path(__file__).resolve().parents[1]
FOLDER = REPO / "kubernetes" / "without-operator"
PROMTOOL = shutil.which("promtool")
AMTOOL = shutil.which("amtool")
KUBECTL = shutil.which("kubectl")


def _prometheus() -> dict:
    return yaml.safe_load((FOLDER / "prometheus.yml").read_text())


def _jobs() -> dict[str, dict]:
    return {job["job_name"]: job for job in _prometheus()["scrape_configs"]}


def _pod_monitors() -> dict[str, dict]:
    path = REPO / "kubernetes" / "prometheus-operator" / "podmonitors.yaml"
    return {doc["metadata"]["name"]: doc for doc in yaml.safe_load_all(path.read_text()) if doc}


# --- relabeling, as Prometheus does it (prometheus.io/docs, configuration: relabel_config) -----


def _relabel(labels: dict[str, str], configs: list[dict]) -> dict[str, str] | None:
    """Actions replace, keep, drop and labeldrop; defaults separator ';', regex '(.*)' (anchored
    at both ends), replacement '$1', action replace. A replace whose result is empty removes the
    target label; labeldrop removes every label whose name matches. None: the target was
    dropped."""
    labels = dict(labels)
    for config in configs:
        action = config.get("action", "replace")
        if action == "labeldrop":
            labels = {k: v for k, v in labels.items() if not re.fullmatch(config["regex"], k)}
            continue
        value = config.get("separator", ";").join(
            labels.get(name, "") for name in config.get("source_labels", [])
        )
        match = re.fullmatch(str(config.get("regex", "(.*)")), value)
        if action == "keep":
            if match is None:
                return None
        elif action == "drop":
            if match is not None:
                return None
        elif action == "replace":
            if match is not None:
                template = re.sub(r"\$\{?(\d+)\}?", r"\\\1", config.get("replacement", "$1"))
                result = match.expand(template)
                if result:
                    labels[config["target_label"]] = result
                else:
                    labels.pop(config["target_label"], None)
        else:
            raise AssertionError(f"action {action} not simulated")
    return labels


def _target_labels(job: dict, meta: dict[str, str]) -> dict[str, str] | None:
    """The labels of a target of ``job`` after relabeling: job from job_name first, instance
    from __address__ when relabeling left it unset, every __ label removed."""
    labels = _relabel({"job": job["job_name"], **meta}, job["relabel_configs"])
    if labels is None:
        return None
    labels.setdefault("instance", labels["__address__"])
    return {name: value for name, value in labels.items() if not name.startswith("__")}


def _discovered(
    pod_labels: dict[str, str], port: tuple[str, int], phase: str = "Running", **meta: str
) -> dict[str, str]:
    """A container port of a pod as kubernetes SD (role pod) labels it, on top of POD_META."""
    discovered = {**POD_META, **meta}
    for name, value in pod_labels.items():
        key = plain_kubernetes.sanitize_label_name(name)
        discovered[f"__meta_kubernetes_pod_label_{key}"] = value
        discovered[f"__meta_kubernetes_pod_labelpresent_{key}"] = "true"
    discovered["__meta_kubernetes_pod_container_port_name"] = port[0]
    discovered["__meta_kubernetes_pod_container_port_number"] = str(port[1])
    discovered["__meta_kubernetes_pod_container_port_protocol"] = "TCP"
    discovered["__meta_kubernetes_pod_phase"] = phase
    return discovered


EXPORTER_POD = operator_resources.EXPORTER_POD_LABELS


# The PodMonitor replay of test_operator_resources.py (the Operator's steps, endpoint included,
# then the PodMonitor's relabelings).
_operator_labels = _scraped_labels


def test_the_exporter_job_gives_the_labels_the_pod_monitor_gives():
    job = _jobs()["vigil-exporter"]
    meta = _discovered(EXPORTER_POD, ("metrics", 9400))
    labels = _target_labels(job, meta)
    assert labels == _operator_labels(_pod_monitors()["llm-vigil-exporter"], meta)
    # The node names the exporter: no pod, container or endpoint (a replaced pod continues the
    # same series, as under the Operator).
    assert labels == {
        "job": "vigil-exporter",
        "instance": "gpu-node-1",
        "node": "gpu-node-1",
        "namespace": "llm-vigil",
    }
    replaced = _discovered(
        EXPORTER_POD,
        ("metrics", 9400),
        __address__="10.1.9.9:9400",
        __meta_kubernetes_pod_name="llm-vigil-exporter-q4m8z",
    )
    assert _target_labels(job, replaced) == labels
    assert job["kubernetes_sd_configs"] == [{"role": "pod", "namespaces": {"names": ["llm-vigil"]}}]


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_an_engine_job_gives_the_labels_the_pod_monitor_gives(engine):
    job = _jobs()[engine]
    port = operator_resources.ENGINE_PORTS[engine]
    meta = _discovered(
        {"llm-vigil.io/engine": engine, "app": "server"},
        ("http", port),
        __address__=f"10.4.5.6:{port}",
        __meta_kubernetes_namespace="serving",
        __meta_kubernetes_pod_name=f"{engine}-0",
        __meta_kubernetes_pod_container_name=engine,
    )
    labels = _target_labels(job, meta)
    assert labels == _operator_labels(_pod_monitors()[f"llm-vigil-{engine}"], meta)
    assert labels["instance"] == f"10.4.5.6:{port}"
    assert (labels["job"], labels["node"], labels["namespace"]) == (engine, "gpu-node-1", "serving")
    assert job["kubernetes_sd_configs"] == [{"role": "pod"}], "every namespace"


@pytest.mark.parametrize(
    ("job_name", "meta"),
    [
        # Another port of the exporter's pod, a pod of another component, a finished pod.
        ("vigil-exporter", _discovered(EXPORTER_POD, ("debug", 9401))),
        (
            "vigil-exporter",
            _discovered({**EXPORTER_POD, "app.kubernetes.io/component": "x"}, ("metrics", 9400)),
        ),
        ("vigil-exporter", _discovered(EXPORTER_POD, ("metrics", 9400), phase="Succeeded")),
        ("vllm", _discovered({"llm-vigil.io/engine": "sglang"}, ("http", 8000))),
        ("vllm", _discovered({"llm-vigil.io/engine": "vllm"}, ("http", 8080))),
        ("sglang", _discovered({"llm-vigil.io/engine": "sglang"}, ("http", 30000), phase="Failed")),
        # The selector's value is matched whole (relabel regexes are anchored).
        ("vllm", _discovered({"llm-vigil.io/engine": "vllm2"}, ("http", 8000))),
    ],
)
def test_a_pod_the_pod_monitor_does_not_select_is_dropped(job_name, meta):
    assert _target_labels(_jobs()[job_name], meta) is None


def test_the_job_names_are_those_the_rules_and_compose_use():
    jobs = _jobs()
    assert rules.PARAMETERS["exporter_job"].default in jobs
    compose = {job["job_name"] for e in ("vllm", "sglang") for job in _compose_engine_jobs(e)}
    assert compose == {"vllm", "vllm-hang", "sglang", "sglang-hang"}
    assert set(jobs) == {"vigil-exporter", "vigil-exporter-hang", "prometheus", "alertmanager"} | (
        compose
    )


@pytest.mark.parametrize(
    ("job", "monitor", "port"),
    [
        ("vigil-exporter", "llm-vigil-exporter", ("metrics", 9400)),
        ("vllm", "llm-vigil-vllm", ("http", 8000)),
        ("sglang", "llm-vigil-sglang", ("http", 30000)),
    ],
)
def test_the_hang_jobs_are_the_pod_monitors_second_endpoints(job, monitor, port):
    """<job>-hang: the target labels, params and metric relabelings of the PodMonitor's second
    endpoint (the hang series every 2 s); <job> drops those series as its first does."""
    pod_labels = EXPORTER_POD if job == "vigil-exporter" else {"llm-vigil.io/engine": job}
    meta = _discovered(pod_labels, port)
    source = _pod_monitors()[monitor]
    endpoint, fast = source["spec"]["podMetricsEndpoints"]
    for name, index, which in ((job, 0, endpoint), (f"{job}-hang", 1, fast)):
        config = _jobs()[name]
        assert _target_labels(config, meta) == _operator_labels(source, meta, index)
        assert config.get("params") == which.get("params")
        assert config["metric_relabel_configs"] == [
            plain_kubernetes.relabel_config(step, "") for step in which["metricRelabelings"]
        ]
        assert (config["scrape_interval"], config["scrape_timeout"]) == (
            which["interval"],
            which["scrapeTimeout"],
        )


def test_the_global_settings_follow_alerts_prometheus_yml():
    config = _prometheus()
    source = yaml.safe_load((REPO / "alerts" / "prometheus.yml").read_text())
    assert {k: v for k, v in config["global"].items() if k != "external_labels"} == source["global"]
    for name in ("vigil-exporter", "vllm", "sglang"):
        job = _jobs()[name]
        assert (job["scrape_interval"], job["scrape_timeout"]) == (
            source["global"]["scrape_interval"],
            source["global"]["scrape_timeout"],
        )
    # The fleet rules and alerts/alertmanager.yml group by cluster: the same value as the
    # kube-prometheus-stack values give.
    values = yaml.safe_load(
        (REPO / "kubernetes" / "kube-prometheus-stack" / "values.yaml").read_text()
    )
    assert (
        config["global"]["external_labels"]
        == values["prometheus"]["prometheusSpec"]["externalLabels"]
    )
    assert config["alerting"]["alertmanagers"] == [
        {"static_configs": [{"targets": ["alertmanager.monitoring.svc:9093"]}]}
    ]


def test_a_pod_monitor_field_the_translation_does_not_know_fails_generation():
    (monitor, *_) = operator_resources.pod_monitors()
    monitor["spec"]["jobLabel"] = "app"
    with pytest.raises(ValueError, match="jobLabel"):
        plain_kubernetes.scrape_config(monitor)
    (monitor, *_) = operator_resources.pod_monitors()
    monitor["spec"]["podMetricsEndpoints"][0]["relabelings"].append(
        {"sourceLabels": ["a"], "targetLabel": "b", "regexp": "x"}
    )
    with pytest.raises(ValueError, match="regexp"):
        plain_kubernetes.scrape_config(monitor)


def test_the_alertmanager_config_is_alerts_alertmanager_yml_with_the_notifiers_service():
    source = yaml.safe_load((REPO / "alerts" / "alertmanager.yml").read_text())
    config = yaml.safe_load((FOLDER / "alertmanager.yml").read_text())
    urls = [
        webhook["url"]
        for receiver in config["receivers"]
        for webhook in receiver.get("webhook_configs", [])
    ]
    assert urls == [
        "http://llm-vigil-notifier.llm-vigil.svc:5001/alerts",
        "http://llm-vigil-notifier.llm-vigil.svc:5001/watchdog",
    ]
    for receiver in config["receivers"] + source["receivers"]:
        for webhook in receiver.get("webhook_configs", []):
            webhook.pop("url")
    assert config["templates"] == ["*.tmpl"]
    config.pop("templates"), source.pop("templates")
    assert config == source


# --- the mounted layout: the ConfigMaps' files in one directory each ---------------------------


def _mounted(tmp_path: Path) -> dict[str, Path]:
    """Each ConfigMap of the folder written out as Kubernetes mounts it (one file per key):
    built by kubectl kustomize where it is installed, else from the kustomization's file list."""
    if KUBECTL:
        built = subprocess.run(
            [KUBECTL, "kustomize", str(FOLDER)], capture_output=True, text=True, check=True
        ).stdout
        maps = {doc["metadata"]["name"]: doc for doc in yaml.safe_load_all(built) if doc}
        assert {doc["metadata"]["namespace"] for doc in maps.values()} == {"monitoring"}
        data = {name: doc["data"] for name, doc in maps.items()}
    else:
        kustomization = yaml.safe_load((FOLDER / "kustomization.yaml").read_text())
        data = {
            generator["name"]: {f: (FOLDER / f).read_text() for f in generator["files"]}
            for generator in kustomization["configMapGenerator"]
        }
    assert set(data) == {"llm-vigil-prometheus", "llm-vigil-alertmanager"}
    mounts = {}
    for name, files in data.items():
        mounts[name] = tmp_path / name
        mounts[name].mkdir()
        for key, text in files.items():
            (mounts[name] / key).write_text(text)
    return mounts


def test_the_prometheus_config_map_holds_the_config_and_every_rule_file(tmp_path):
    mount = _mounted(tmp_path)["llm-vigil-prometheus"]
    rule_files = sorted(path.name for path in (REPO / "alerts").glob("*.rules.yml"))
    assert sorted(path.name for path in mount.iterdir()) == sorted(["prometheus.yml", *rule_files])
    for name in rule_files:
        assert (mount / name).read_text() == (REPO / "alerts" / name).read_text()


def _promtool_knows_kubernetes_sd(tmp_path: Path) -> bool:
    probe = tmp_path / "probe.yml"
    probe.write_text(
        yaml.safe_dump(
            {"scrape_configs": [{"job_name": "x", "kubernetes_sd_configs": [{"role": "pod"}]}]}
        )
    )
    result = subprocess.run(
        [PROMTOOL, "check", "config", str(probe)], capture_output=True, text=True
    )
    return result.returncode == 0


# The fields of Prometheus' kubernetes SDConfig and NamespaceDiscovery this config uses
# (discovery/kubernetes/kubernetes.go: role, namespaces {names, own_namespace}).
SD_FIELDS = {"role", "namespaces"}


def _without_kubernetes_sd(config: dict) -> dict:
    """kubernetes_sd_configs checked by hand and replaced by a file_sd_config."""
    for job in config["scrape_configs"]:
        for sd in job.pop("kubernetes_sd_configs", []):
            assert set(sd) <= SD_FIELDS and sd["role"] == "pod", sd
            assert set(sd.get("namespaces", {})) <= {"names"}
            job["file_sd_configs"] = [{"files": [f"{job['job_name']}.targets.json"]}]
    return config


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian: prometheus)")
def test_promtool_checks_the_config_and_its_rule_files_as_mounted(tmp_path):
    mount = _mounted(tmp_path)["llm-vigil-prometheus"]
    if not _promtool_knows_kubernetes_sd(tmp_path):
        config = yaml.safe_load((mount / "prometheus.yml").read_text())
        (mount / "prometheus.yml").write_text(yaml.safe_dump(_without_kubernetes_sd(config)))
    result = subprocess.run(
        [PROMTOOL, "check", "config", str(mount / "prometheus.yml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # promtool checks the rule files the config names: every one was found and read.
    found = re.findall(r"SUCCESS: (\d+) rules found", result.stdout + result.stderr)
    assert len(found) == len(list((REPO / "alerts").glob("*.rules.yml"))), result.stdout


@pytest.mark.skipif(AMTOOL is None, reason="amtool not installed (Debian: prometheus-alertmanager)")
def test_amtool_checks_the_alertmanager_config_as_mounted(tmp_path):
    mount = _mounted(tmp_path)["llm-vigil-alertmanager"]
    result = subprocess.run(
        [AMTOOL, "check-config", str(mount / "alertmanager.yml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # The template beside it was loaded (amtool lists the templates it found).
    assert " - 1 templates" in result.stdout, result.stdout
