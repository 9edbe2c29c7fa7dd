"""The Prometheus Operator's resources (kubernetes/prometheus-operator/) hold exactly what the
stack loads: the PrometheusRule's groups are those of alerts/*.rules.yml and pass promtool, the
dashboard ConfigMaps carry dashboards/*.json unchanged under the sidecar's label, the PodMonitors
give the jobs and labels the rules select on, the AlertmanagerConfig routes as
alerts/alertmanager.yml does, every resource has only fields its CRD declares, and
`kubectl kustomize` builds the folder. Read from the committed files, not from the generator
(test_generated_files.py checks that they are current).

The CRDs: example/prometheus-operator-crd/monitoring.coreos.com_{prometheusrules,podmonitors,
alertmanagerconfigs}.yaml of prometheus-operator at tag OPERATOR_VERSION (v0.93.0), unchanged.
Files fetched from upstream repositories may not be committed to this repository, so they are
not here: the schema checks run only where someone provides them, in CRD_DIR
($VIGIL_OPERATOR_CRDS, or shared/crds/prometheus-operator/<version>/ beside the repository).
Everywhere else, CI included, those tests skip, saying so, and the check of the same resources
against the Operator's Go API types below (an npm package, installed by scripts/test) is the
one that runs.

The Operator's Go API types, from a package registry, so that CI checks too: npm
@kubernetes-models/prometheus-operator (MODELS_VERSION), TypeScript models generated from
pkg/apis/monitoring v1 and v1alpha1 of prometheus-operator MODELS_OPERATOR_VERSION (its
CHANGELOG and go.mod; it has that release's fields, such as Sigv4's externalId, and none of
v0.92.0's, such as a webhook's payload). tests/operator_models.mjs types each resource as an
object literal of the package's interface and runs TypeScript's compiler (strict): an undeclared
field fails the excess property check, a wrong type the assignment; and it runs the package's
validate() (ajv: types, required fields, enums, which TypeScript sees as plain strings). Both
check an AlertmanagerConfig's child routes as routes (the Go type leaves them free-form JSON).
scripts/test installs the packages (scripts/lib/venv.sh, NPM_PACKAGES) into .cache/npm; the
tests skip where node or the packages are missing.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from alerts.rules import HANG_SERIES
from tools import operator_resources
from tools.operator_resources import (
    ALERTMANAGER_NAMESPACE,
    EXPORTER_NAMESPACE,
    OPERATOR_VERSION,
    alertmanager_config,
    parse_matchers,
)

REPO = Path(__file__).resolve().parents[1]
FOLDER = REPO / "kubernetes" / "prometheus-operator"
KUBECTL = shutil.which("kubectl")
PROMTOOL = shutil.which("promtool")
# A ConfigMap holds at most 1 MiB (Kubernetes' ConfigMap concept page), and `kubectl apply`
# without --server-side copies the object into an annotation of at most 256 KiB.
ANNOTATION_LIMIT = 256 * 1024
CRD_DIR = Path(
    os.environ.get("VIGIL_OPERATOR_CRDS")
    or REPO.parent / "shared" / "crds" / "prometheus-operator" / OPERATOR_VERSION
)
CRD_FILES = {
    "PrometheusRule": "monitoring.coreos.com_prometheusrules.yaml",
    "PodMonitor": "monitoring.coreos.com_podmonitors.yaml",
    "AlertmanagerConfig": "monitoring.coreos.com_alertmanagerconfigs.yaml",
}


class _Loader(yaml.SafeLoader):
    """YAML 1.1's `=` value tag off: Go's YAML (kubectl kustomize's output, the CRDs' enums)
    writes a matchType of "=" unquoted, which PyYAML would read as that tag and refuse."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:value"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _documents(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((FOLDER / name).read_text()) if doc]


def _rule(documents: list[dict]) -> dict:
    (rule,) = [doc for doc in documents if doc["kind"] == "PrometheusRule"]
    return rule


def test_the_prometheus_rule_holds_exactly_the_rules_of_alerts():
    rule = _rule(_documents("prometheusrule.yaml"))
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    expected = []
    for path in sorted((REPO / "alerts").glob("*.rules.yml")):
        expected += yaml.safe_load(path.read_text())["groups"]
    by_name = {group["name"]: group for group in rule["spec"]["groups"]}
    assert len(by_name) == len(rule["spec"]["groups"]), "group names are unique"
    assert by_name == {group["name"]: group for group in expected}


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian: prometheus)")
def test_the_prometheus_rule_passes_promtool(tmp_path):
    groups = _rule(_documents("prometheusrule.yaml"))["spec"]["groups"]
    rules_file = tmp_path / "operator.rules.yml"
    rules_file.write_text(yaml.safe_dump({"groups": groups}))
    result = subprocess.run(
        [PROMTOOL, "check", "rules", str(rules_file)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_dashboard_config_maps_carry_the_dashboards_under_the_sidecars_label():
    maps = _documents("dashboards.yaml")
    carried = {}
    for config_map in maps:
        assert config_map["kind"] == "ConfigMap"
        # kube-prometheus-stack's Grafana sidecar: grafana.sidecar.dashboards.label/labelValue.
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert len(json.dumps(config_map).encode()) < ANNOTATION_LIMIT
        carried.update(config_map["data"])
    assert len({m["metadata"]["name"] for m in maps}) == len(maps)
    files = {path.name: path for path in (REPO / "dashboards").glob("*.json")}
    assert set(carried) == set(files)
    for name, text in carried.items():
        assert json.loads(text) == json.loads(files[name].read_text()), name


@pytest.mark.skipif(KUBECTL is None, reason="kubectl not installed")
def test_kubectl_kustomize_builds_the_folder():
    result = subprocess.run(
        [KUBECTL, "kustomize", str(FOLDER)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    built = [doc for doc in yaml.load_all(result.stdout, Loader=_Loader) if doc]  # noqa: S506
    kinds = sorted(doc["kind"] for doc in built)
    dashboards = len(list((REPO / "dashboards").glob("*.json")))
    assert kinds == sorted(
        ["ConfigMap"] * dashboards + ["PrometheusRule", "AlertmanagerConfig"] + ["PodMonitor"] * 3
    )
    # Every object lands in the namespace of kubernetes/base, but the AlertmanagerConfig, in the
    # Alertmanager's (the matcher strategy leaves it unscoped there); the rest unchanged.
    namespaces = {(doc["kind"], doc["metadata"]["namespace"]) for doc in built}
    assert namespaces == {
        ("ConfigMap", EXPORTER_NAMESPACE),
        ("PrometheusRule", EXPORTER_NAMESPACE),
        ("PodMonitor", EXPORTER_NAMESPACE),
        ("AlertmanagerConfig", ALERTMANAGER_NAMESPACE),
    }
    committed = _rule(_documents("prometheusrule.yaml"))
    committed["metadata"]["namespace"] = EXPORTER_NAMESPACE
    assert _rule(built) == committed


def _operator_resources() -> list[dict]:
    """Every Prometheus Operator resource of the folder (ConfigMaps are Kubernetes' own)."""
    documents = []
    for path in sorted(FOLDER.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            documents += _documents(path.name)
    return [doc for doc in documents if doc["apiVersion"].startswith("monitoring.coreos.com/")]


def _pod_monitors() -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in _documents("podmonitors.yaml")}


def _relabel(labels: dict[str, str], relabelings: list[dict]) -> dict[str, str]:
    """Prometheus' relabeling, actions replace and labeldrop (the only ones these PodMonitors
    use; prometheus.io/docs, configuration: relabel_config): replace joins the source labels by
    ';', matches the regex (default (.*)) anchored at both ends and writes the replacement
    ($1 by default) into the target label; labeldrop removes every label whose name matches the
    regex, anchored likewise."""
    labels = dict(labels)
    for step in relabelings:
        action = step.get("action", "replace").lower()
        if action == "labeldrop":
            labels = {k: v for k, v in labels.items() if not re.fullmatch(step["regex"], k)}
            continue
        assert action == "replace", step
        value = ";".join(labels.get(name, "") for name in step.get("sourceLabels", []))
        match = re.fullmatch(step.get("regex", "(.*)"), value)
        if match:
            labels[step["targetLabel"]] = match.expand(
                step.get("replacement", "$1").replace("$1", r"\1").replace("${1}", r"\1")
            )
    return labels


def _scraped_labels(monitor: dict, meta: dict[str, str], index: int = 0) -> dict[str, str]:
    """The target labels Prometheus gives a pod: the Operator's relabelings first (namespace,
    container, pod, then job = <namespace>/<PodMonitor>, then endpoint = the port's name when
    the endpoint names one: pkg/prometheus/promcfg.go generatePodMonitorConfig, v0.93.0 lines
    1599-1654), then the endpoint's (line 1661); instance from __address__ when unset. Endpoint
    ``index`` of the PodMonitor."""
    endpoint = monitor["spec"]["podMetricsEndpoints"][index]
    operator = [
        {"sourceLabels": ["__meta_kubernetes_namespace"], "targetLabel": "namespace"},
        {"sourceLabels": ["__meta_kubernetes_pod_container_name"], "targetLabel": "container"},
        {"sourceLabels": ["__meta_kubernetes_pod_name"], "targetLabel": "pod"},
        {"targetLabel": "job", "replacement": f"monitoring/{monitor['metadata']['name']}"},
    ]
    if endpoint.get("port"):
        operator.append({"targetLabel": "endpoint", "replacement": endpoint["port"]})
    labels = _relabel(meta, operator + endpoint.get("relabelings", []))
    labels.setdefault("instance", labels["__address__"])
    return {name: value for name, value in labels.items() if not name.startswith("__")}


POD_META = {
    "__address__": "10.1.2.3:9400",
    "__meta_kubernetes_namespace": "llm-vigil",
    "__meta_kubernetes_pod_name": "llm-vigil-exporter-x7k2p",
    "__meta_kubernetes_pod_container_name": "exporter",
    "__meta_kubernetes_pod_node_name": "gpu-node-1",
}


def test_the_exporter_pod_monitor_selects_the_exporter_and_yields_job_vigil_exporter():
    monitor = _pod_monitors()["llm-vigil-exporter"]
    spec = monitor["spec"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert spec["selector"] == {
        "matchLabels": {
            "app.kubernetes.io/name": "llm-vigil",
            "app.kubernetes.io/component": "exporter",
        }
    }
    assert spec["namespaceSelector"] == {"matchNames": ["llm-vigil"]}
    endpoint, fast = spec["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("metrics", "/metrics")
    # The hang series (read at test time: a rule that reads another fails this until the
    # PodMonitor follows): asked for every 2 s on the same port (the exporter honours name[]),
    # stored under the exporter's job; the first endpoint drops them.
    names = set(HANG_SERIES["vigil-exporter"])
    (drop,) = endpoint["metricRelabelings"]
    assert drop["action"] == "drop" and set(drop["regex"].split("|")) == names
    assert (fast["port"], fast["path"]) == ("metrics", "/metrics")
    assert set(fast["params"]["name[]"]) == names
    # Kept to them after the scrape too: an exporter that ignores name[] (an older image during
    # a rolling upgrade) would otherwise have every series stored twice under the same labels.
    keep, rename = fast["metricRelabelings"]
    assert keep == {"sourceLabels": ["__name__"], "regex": drop["regex"], "action": "keep"}
    assert rename == {"targetLabel": "job", "replacement": "vigil-exporter"}
    shipped = {
        job["job_name"]: job
        for job in yaml.safe_load((REPO / "alerts" / "prometheus.yml").read_text())[
            "scrape_configs"
        ]
    }["vigil-exporter-hang"]
    assert (fast["interval"], fast["scrapeTimeout"]) == (
        shipped["scrape_interval"],
        shipped["scrape_timeout"],
    )
    fast_labels = _scraped_labels(monitor, POD_META, 1)
    assert fast_labels == {**_scraped_labels(monitor, POD_META), "job": "vigil-exporter-hang"}
    # The rules' windows were written for the stack's scrape timing.
    timing = yaml.safe_load((REPO / "alerts" / "prometheus.yml").read_text())["global"]
    assert (endpoint["interval"], endpoint["scrapeTimeout"]) == (
        timing["scrape_interval"],
        timing["scrape_timeout"],
    )
    labels = _scraped_labels(monitor, POD_META)
    # alerts/rules.py's exporter_job: the rules' absent() and up{} select it.
    assert labels["job"] == "vigil-exporter"
    assert labels["node"] == labels["instance"] == "gpu-node-1"
    assert labels["namespace"] == "llm-vigil"


def test_a_replaced_exporter_pod_continues_the_same_series():
    """A DaemonSet pod replaced on its node (new name and address; after a restart of the
    container its name too may differ): the target's labels, hence every series' labels, are
    the old pod's. With the Operator's pod, container or endpoint left on, the new pod's series
    would start beside the old ones, and a GPU join would see two series of one GPU until the
    old went stale."""
    monitor = _pod_monitors()["llm-vigil-exporter"]
    replaced = {
        **POD_META,
        "__address__": "10.1.9.9:9400",
        "__meta_kubernetes_pod_name": "llm-vigil-exporter-q4m8z",
        "__meta_kubernetes_pod_container_name": "exporter-renamed",
    }
    old, new = _scraped_labels(monitor, POD_META), _scraped_labels(monitor, replaced)
    assert old == new
    assert old == {
        "job": "vigil-exporter",
        "instance": "gpu-node-1",
        "node": "gpu-node-1",
        "namespace": "llm-vigil",
    }
    # Another node's exporter stays apart.
    elsewhere = {**replaced, "__meta_kubernetes_pod_node_name": "gpu-node-2"}
    assert _scraped_labels(monitor, elsewhere)["instance"] == "gpu-node-2"


def _compose_engine_jobs(engine: str) -> list[dict]:
    """The jobs compose/prometheus/<engine>.yml adds to alerts/prometheus.yml's."""
    shared = yaml.safe_load((REPO / "alerts" / "prometheus.yml").read_text())["scrape_configs"]
    jobs = yaml.safe_load((REPO / "compose" / "prometheus" / f"{engine}.yml").read_text())
    return [
        job
        for job in jobs["scrape_configs"]
        if job["job_name"] not in {j["job_name"] for j in shared}
    ]


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_an_engine_pod_monitor_scrapes_the_engine_port_in_any_namespace(engine):
    spec = _pod_monitors()[f"llm-vigil-{engine}"]["spec"]
    assert spec["selector"] == {"matchLabels": {"llm-vigil.io/engine": engine}}
    assert spec["namespaceSelector"] == {"any": True}
    endpoint, fast = spec["podMetricsEndpoints"]
    assert endpoint["portNumber"] == fast["portNumber"] == operator_resources.ENGINE_PORTS[engine]
    assert "port" not in endpoint, "a port name takes precedence over portNumber"
    assert endpoint["path"] == "/metrics"
    meta = {**POD_META, "__address__": "10.4.5.6:8000", "__meta_kubernetes_namespace": "serving"}
    labels = _scraped_labels(_pod_monitors()[f"llm-vigil-{engine}"], meta)
    compose_job, compose_fast = _compose_engine_jobs(engine)
    assert labels["job"] == compose_job["job_name"] == engine
    # The hang series: the whole /metrics every 2 s kept to them (the engines' /metrics do not
    # filter by name[]), under the engine's job; the first endpoint drops them; as in compose.
    names = set(HANG_SERIES[engine])
    assert "params" not in fast
    keep, rename = fast["metricRelabelings"]
    assert keep["action"] == "keep" and set(keep["regex"].split("|")) == names
    assert rename == {"targetLabel": "job", "replacement": engine}
    (drop,) = endpoint["metricRelabelings"]
    assert drop["action"] == "drop" and set(drop["regex"].split("|")) == names
    assert (fast["interval"], fast["scrapeTimeout"]) == (
        compose_fast["scrape_interval"],
        compose_fast["scrape_timeout"],
    )
    assert compose_fast["metric_relabel_configs"][0]["regex"] == keep["regex"]
    fast_labels = _scraped_labels(_pod_monitors()[f"llm-vigil-{engine}"], meta, 1)
    assert fast_labels["job"] == compose_fast["job_name"] == f"{engine}-hang"
    assert labels["node"] == "gpu-node-1"
    # The engine keeps its address as instance: the rules match it to the exporter's target;
    # and its pod (an engine pod is its own server, not a node's).
    assert labels["instance"] == "10.4.5.6:8000"
    assert labels["pod"] == POD_META["__meta_kubernetes_pod_name"]


def test_no_pod_monitor_scrapes_our_own_inference_process():
    """The exporter republishes our process's metrics: scraping it too would double count."""
    jobs = set()
    for monitor in _pod_monitors().values():
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            jobs |= {
                step["replacement"]
                for step in endpoint["relabelings"]
                if step.get("targetLabel") == "job"
            }
    assert jobs == {"vigil-exporter", "vllm", "sglang"} | {
        f"{job}-hang" for job in ("vigil-exporter", "vllm", "sglang")
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('alertname="Watchdog"', [("alertname", "Watchdog", "=")]),
        ("severity = critical", [("severity", "critical", "=")]),
        ('cause!="hang"', [("cause", "hang", "!=")]),
        ('alertname=~"A|B"', [("alertname", "A|B", "=~")]),
        ('cause !~ "node|watchdog"', [("cause", "node|watchdog", "!~")]),
        (r'msg="say \"hi\", a\\b"', [("msg", 'say "hi", a\\b', "=")]),
        ('{a="1", b!~"2,3"}', [("a", "1", "="), ("b", "2,3", "!~")]),
        ('a=""', [("a", "", "=")]),
    ],
)
def test_alertmanager_matchers_are_parsed_into_objects(text, expected):
    assert parse_matchers(text) == [
        {"name": name, "value": value, "matchType": kind} for name, value, kind in expected
    ]


@pytest.mark.parametrize("text", ["", "severity", '1a="b"', 'a=="b"', 'a="b', r'a="\q"'])
def test_a_matcher_that_does_not_parse_fails(text):
    with pytest.raises(ValueError):
        parse_matchers(text)


def _untranslated_route(route: dict) -> dict:
    """An AlertmanagerConfig route back in alertmanager.yml's keys, matchers as tuples."""
    keys = {value: key for key, value in operator_resources._ROUTE_KEYS.items()}
    out = {keys[key]: value for key, value in route.items() if key in keys}
    if "matchers" in route:
        out["matchers"] = [(m["name"], m["value"], m["matchType"]) for m in route["matchers"]]
    if "routes" in route:
        out["routes"] = [_untranslated_route(child) for child in route["routes"]]
    assert set(route) <= set(keys) | {"matchers", "routes"}, route
    return out


def _source_route(route: dict) -> dict:
    out = {key: value for key, value in route.items() if key not in ("matchers", "routes")}
    if "matchers" in route:
        out["matchers"] = [
            (m["name"], m["value"], m["matchType"])
            for item in route["matchers"]
            for m in parse_matchers(item)
        ]
    if "routes" in route:
        out["routes"] = [_source_route(child) for child in route["routes"]]
    return out


def _alert_names() -> set[str]:
    names = set()
    for path in (REPO / "alerts").glob("*.rules.yml"):
        for group in yaml.safe_load(path.read_text())["groups"]:
            names |= {rule["alert"] for rule in group["rules"] if "alert" in rule}
    return names


def _is_scope(matchers: list[dict]) -> bool:
    """Our alerts: by name (every alert of alerts/) and carrying a cause (another stack's alert
    of the same name, kube-prometheus-stack's Watchdog, has none)."""
    names, cause = matchers
    return (
        (names["name"], names["matchType"]) == ("alertname", "=~")
        and set(names["value"].split("|")) == _alert_names()
        and cause == {"name": "cause", "value": ".+", "matchType": "=~"}
    )


def test_the_alertmanager_config_routes_as_alertmanager_yml_does():
    (config,) = _documents("alertmanagerconfig.yaml")
    assert (config["apiVersion"], config["kind"]) == (
        "monitoring.coreos.com/v1alpha1",
        "AlertmanagerConfig",
    )
    source = yaml.safe_load((REPO / "alerts" / "alertmanager.yml").read_text())
    route = dict(config["spec"]["route"])
    # The root is limited to our alerts (the Operator makes it a child of the Alertmanager's
    # root with continue: true); below it the tree is alertmanager.yml's.
    *own, names, cause = route.pop("matchers")
    assert _is_scope([names, cause])
    if own:
        route["matchers"] = own
    assert _untranslated_route(route) == _source_route(source["route"])

    inhibit = config["spec"]["inhibitRules"]
    assert len(inhibit) == len(source["inhibit_rules"])
    for translated, rule in zip(inhibit, source["inhibit_rules"], strict=True):
        for side, key in (("sourceMatch", "source_matchers"), ("targetMatch", "target_matchers")):
            *matchers, names, cause = translated[side]
            assert _is_scope([names, cause])
            assert matchers == [m for item in rule[key] for m in parse_matchers(item)]
        assert translated.get("equal") == rule.get("equal")

    receivers = {receiver["name"]: receiver for receiver in config["spec"]["receivers"]}
    assert set(receivers) == {receiver["name"] for receiver in source["receivers"]}
    for receiver in source["receivers"]:
        hooks = receivers[receiver["name"]]["webhookConfigs"]
        for hook, original in zip(hooks, receiver["webhook_configs"], strict=True):
            path = original["url"].split("127.0.0.1:5001", 1)[1]
            assert hook["url"] == operator_resources.NOTIFIER_URL + path
            assert hook.get("sendResolved") == original.get("send_resolved")
            assert hook.get("maxAlerts") == original.get("max_alerts")


def _minimal_alertmanager_yml() -> dict:
    return {
        "route": {"receiver": "webhook"},
        "receivers": [{"name": "webhook", "webhook_configs": [{"url": "http://x:5001/alerts"}]}],
    }


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda c: c["receivers"][0].update(email_configs=[{"to": "a@b"}]), "email_configs"),
        (lambda c: c["receivers"][0]["webhook_configs"][0].update(http_config={}), "http_config"),
        (lambda c: c["route"].update(match={"a": "b"}), "match"),
        (lambda c: c.update(time_intervals=[]), "time_intervals"),
        (lambda c: c.update(inhibit_rules=[{"source_match": {"a": "b"}}]), "source_match"),
    ],
)
def test_what_cannot_be_translated_fails_generation(change, named):
    config = _minimal_alertmanager_yml()
    alertmanager_config(config)  # the minimal one translates
    change(config)
    with pytest.raises(ValueError, match=named):
        alertmanager_config(config)


# --- the CRDs' schemas ----------------------------------------------------------------------------


def _schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> openAPIV3Schema of each served version of the vendored CRDs."""
    if not all((CRD_DIR / name).is_file() for name in CRD_FILES.values()):
        pytest.skip(
            f"the Prometheus Operator {OPERATOR_VERSION} CRDs are not in {CRD_DIR}: fetched"
            " upstream files may not be committed here, so this check runs only where they are"
            " provided (VIGIL_OPERATOR_CRDS); CI runs the npm-types check"
            " (test_every_operator_resource_passes_the_operators_go_types) instead"
        )
    schemas = {}
    for kind, name in CRD_FILES.items():
        crd = yaml.load((CRD_DIR / name).read_text(), Loader=_Loader)  # noqa: S506
        assert crd["spec"]["names"]["kind"] == kind
        for version in crd["spec"]["versions"]:
            if version["served"]:
                api_version = f"{crd['spec']['group']}/{version['name']}"
                schemas[(api_version, kind)] = version["schema"]["openAPIV3Schema"]
    return schemas


def undeclared_fields(value, schema: dict, path: str = "") -> list[str]:
    """Paths of the fields in ``value`` that ``schema`` does not declare: the API server prunes
    them from a structural schema's object without a word (only x-kubernetes-preserve-unknown-
    fields keeps them), so a misspelt field is a setting silently lost."""
    found = []
    if isinstance(value, dict):
        properties = schema.get("properties")
        additional = schema.get("additionalProperties")
        for key, item in value.items():
            if properties is not None and key in properties:
                found += undeclared_fields(item, properties[key], f"{path}.{key}")
            elif isinstance(additional, dict):
                found += undeclared_fields(item, additional, f"{path}.{key}")
            elif properties is not None or not schema.get("x-kubernetes-preserve-unknown-fields"):
                found.append(f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            found += undeclared_fields(item, schema["items"], f"{path}[{index}]")
    return found


def test_the_strict_walk_finds_a_field_the_schema_does_not_declare():
    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "object", "properties": {"b": {"type": "string"}}},
            "l": {"type": "array", "items": {"type": "object", "properties": {"c": {}}}},
            "m": {"type": "object", "additionalProperties": {"type": "string"}},
            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        },
    }
    good = {"a": {"b": "x"}, "l": [{"c": 1}], "m": {"any": "y"}, "free": {"z": 1}}
    assert undeclared_fields(good, schema) == []
    bad = {"a": {"b": "x", "bb": 1}, "l": [{"c": 1}, {"d": 2}], "e": 3}
    assert undeclared_fields(bad, schema) == [".a.bb", ".l[1].d", ".e"]


def _child_routes(route: dict, path: str):
    for index, child in enumerate(route.get("routes", [])):
        yield f"{path}.routes[{index}]", child
        yield from _child_routes(child, f"{path}.routes[{index}]")


def _problems(document: dict, schemas: dict) -> list[str]:
    schema = schemas[(document["apiVersion"], document["kind"])]
    problems = [
        f"{'.'.join(map(str, error.absolute_path))}: {error.message}"
        for error in jsonschema.Draft7Validator(schema).iter_errors(document)
    ]
    # metadata is the API server's ObjectMeta, which the CRD's schema leaves undeclared.
    body = {key: value for key, value in document.items() if key != "metadata"}
    problems += [f"undeclared {path}" for path in undeclared_fields(body, schema)]
    if document["kind"] == "AlertmanagerConfig":
        # Child routes are x-kubernetes-preserve-unknown-fields in the CRD; the Operator decodes
        # each as a Route with DisallowUnknownFields (pkg/apis/monitoring/v1alpha1/
        # alertmanager_config_types.go, Route.ChildRoutes) and rejects the whole object.
        route_schema = schema["properties"]["spec"]["properties"]["route"]
        for path, child in _child_routes(document["spec"]["route"], "spec.route"):
            problems += [
                f"{path}: {error.message}"
                for error in jsonschema.Draft7Validator(route_schema).iter_errors(child)
            ]
            problems += [f"undeclared {path}{p}" for p in undeclared_fields(child, route_schema)]
    return problems


def test_every_operator_resource_has_only_fields_its_crd_declares():
    schemas = _schemas()
    resources = _operator_resources()
    assert {doc["kind"] for doc in resources} == set(CRD_FILES)
    for document in resources:
        assert _problems(document, schemas) == [], document["metadata"]["name"]


@pytest.mark.parametrize(
    ("kind", "spoil", "expected"),
    [
        # A plausible slip: `portName` for `port`. jsonschema alone accepts it (the CRD's
        # objects allow additional properties); the API server would drop it and scrape every
        # declared port.
        (
            "PodMonitor",
            lambda d: d["spec"]["podMetricsEndpoints"][0].update(portName="metrics"),
            "undeclared .spec.podMetricsEndpoints[0].portName",
        ),
        (
            "AlertmanagerConfig",
            lambda d: d["spec"]["route"]["routes"][0].update(group_wait="0s"),
            "undeclared spec.route.routes[0].group_wait",
        ),
        (
            "AlertmanagerConfig",
            lambda d: d["spec"]["route"]["matchers"][0].update(matchType="=="),
            "spec.route.matchers.0.matchType: '==' is not one of",
        ),
    ],
)
def test_a_wrong_field_is_caught(kind, spoil, expected):
    schemas = _schemas()
    (document,) = [doc for doc in _operator_resources() if doc["kind"] == kind][:1]
    spoil(document)
    problems = _problems(document, schemas)
    assert any(problem.startswith(expected) for problem in problems), problems


# --- the Operator's Go API types (npm @kubernetes-models/prometheus-operator) --------------------

NODE = shutil.which("node")
NPM_MODULES = REPO / ".cache" / "npm" / "node_modules"
MODELS_PACKAGE = "@kubernetes-models/prometheus-operator"
MODELS_VERSION = "6.0.0"  # pinned in scripts/lib/venv.sh
MODELS_OPERATOR_VERSION = "v0.91.0"
MODELS_CHECK = REPO / "tests" / "operator_models.mjs"
ROUTE_MODEL = "monitoring.coreos.com/v1alpha1/Route"


def _model_units(document: dict) -> list[tuple[str, str, dict]]:
    """(path, model, value) to check: the document, and each child route of an
    AlertmanagerConfig as a Route (the Go type's ChildRoutes are apiextensionsv1.JSON, which the
    package types as {}: the Operator decodes each as a Route, see _problems)."""
    units = [("", f"{document['apiVersion']}/{document['kind']}", document)]
    if document["kind"] == "AlertmanagerConfig":
        units += [
            (path, ROUTE_MODEL, child)
            for path, child in _child_routes(document["spec"]["route"], ".spec.route")
        ]
    return units


def _model_problems(documents: list[dict]) -> list[list[str]]:
    """Per document: "tsc PATH: message" and "validate PATH: message" for each problem that
    tests/operator_models.mjs finds (TypeScript names the first problem of each document and
    child route, validate() all)."""
    package = NPM_MODULES / MODELS_PACKAGE / "package.json"
    if NODE is None or not package.is_file() or not (NPM_MODULES / "typescript").is_dir():
        pytest.skip(
            f"node, typescript or {MODELS_PACKAGE} missing (scripts/test installs them with npm"
            " into .cache/npm)"
        )
    installed = json.loads(package.read_text())["version"]
    assert installed == MODELS_VERSION, (
        f"{MODELS_PACKAGE} {installed} in {NPM_MODULES}, not {MODELS_VERSION} (scripts/test"
        " installs the version scripts/lib/venv.sh pins)"
    )
    units = [
        (index, path, model, value)
        for index, document in enumerate(documents)
        for path, model, value in _model_units(document)
    ]
    result = subprocess.run(
        [NODE, str(MODELS_CHECK), str(NPM_MODULES)],
        input=json.dumps([{"type": model, "value": value} for _, _, model, value in units]),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    *found, outside = json.loads(result.stdout)
    assert outside == [], outside  # an import that does not resolve, say
    problems: list[list[str]] = [[] for _ in documents]
    for (index, prefix, _, _), unit_problems in zip(units, found, strict=True):
        problems[index] += [
            f"{p['check']} {prefix}{p['path']}: {p['message']}" for p in unit_problems
        ]
    return problems


def _built_resources() -> list[dict]:
    """The Operator resources as `kubectl kustomize` builds the folder where kubectl is
    installed (what `kubectl apply -k` sends), else as the folder's files hold them."""
    if KUBECTL is None:
        return _operator_resources()
    result = subprocess.run(
        [KUBECTL, "kustomize", str(FOLDER)], capture_output=True, text=True, check=True
    )
    built = [doc for doc in yaml.load_all(result.stdout, Loader=_Loader) if doc]  # noqa: S506
    return [doc for doc in built if doc["apiVersion"].startswith("monitoring.coreos.com/")]


def test_every_operator_resource_passes_the_operators_go_types():
    resources = _built_resources()
    assert sorted(doc["kind"] for doc in resources) == sorted(
        ["PrometheusRule", "AlertmanagerConfig"] + ["PodMonitor"] * 3
    )
    assert any(_model_units(doc)[1:] for doc in resources), "child routes are checked"
    problems = _model_problems(resources)
    for document, found in zip(resources, problems, strict=True):
        assert found == [], (
            f"{document['kind']} {document['metadata']['name']} against the Operator's"
            f" {MODELS_OPERATOR_VERSION} types ({MODELS_PACKAGE} {MODELS_VERSION}): {found}"
        )


SPOILT = [
    # An undeclared field: `portName` for `port` (validate() lets it through).
    (
        "PodMonitor",
        lambda d: d["spec"]["podMetricsEndpoints"][0].update(portName="metrics"),
        [
            "tsc .spec.podMetricsEndpoints[0].portName: Object literal may only specify"
            " known properties, and 'portName' does not exist in type 'IPodMetricsEndpoint'"
        ],
    ),
    # A wrong type: an interval in seconds as a number, not a duration.
    (
        "PodMonitor",
        lambda d: d["spec"]["podMetricsEndpoints"][0].update(interval=10),
        [
            "tsc .spec.podMetricsEndpoints[0].interval: Type 'number' is not assignable to"
            " type 'string'",
            "validate .spec.podMetricsEndpoints[0].interval: must be string",
        ],
    ),
    (
        "PrometheusRule",
        lambda d: d["spec"]["groups"][0]["rules"][0].update(labels={"severity": 1}),
        [
            "tsc .spec.groups[0].rules[0].labels.severity: Type 'number' is not assignable"
            " to type 'string'",
            "validate .spec.groups[0].rules[0].labels.severity: must be string",
        ],
    ),
    # alertmanager.yml's group_by spelt with the wrong case, at the root and in a child
    # route (the Go type leaves child routes free-form: checked as routes of their own).
    (
        "AlertmanagerConfig",
        lambda d: d["spec"]["route"].update(groupby=["alertname"]),
        [
            "tsc .spec.route.groupby: Object literal may only specify known properties,"
            " but 'groupby' does not exist in type 'IRoute'. Did you mean to write 'groupBy'?"
        ],
    ),
    (
        "AlertmanagerConfig",
        lambda d: d["spec"]["route"]["routes"][0].update(groupby=["alertname"]),
        ["tsc .spec.route.routes[0].groupby: Object literal may only specify known"],
    ),
    # A wrong type two levels down (alertmanager.yml's node and GPU route's children).
    (
        "AlertmanagerConfig",
        lambda d: d["spec"]["route"]["routes"][1]["routes"][0].update(groupWait=30),
        [
            "tsc .spec.route.routes[1].routes[0].groupWait: Type 'number' is not assignable"
            " to type 'string'",
            "validate .spec.route.routes[1].routes[0].groupWait: must be string",
        ],
    ),
    # An enum, which the types leave a string and validate() checks.
    (
        "AlertmanagerConfig",
        lambda d: d["spec"]["route"]["routes"][0]["matchers"][0].update(matchType="=="),
        [
            "validate .spec.route.routes[0].matchers[0].matchType: must be equal to one of"
            " the allowed values (!=, =, =~, !~)"
        ],
    ),
]


@functools.cache
def _spoilt_problems() -> list[list[str]]:
    """The problems of each case of SPOILT: all in one run of node (each takes seconds)."""
    documents = []
    for kind, spoil, _ in SPOILT:
        documents.append(next(doc for doc in _operator_resources() if doc["kind"] == kind))
        spoil(documents[-1])
    return _model_problems(documents)


@pytest.mark.parametrize(
    "case",
    range(len(SPOILT)),
    ids=[f"{kind}:{expected[0].split(':')[0]}" for kind, _, expected in SPOILT],
)
def test_a_wrong_field_fails_the_operators_go_types(case):
    problems = _spoilt_problems()[case]
    for start in SPOILT[case][2]:
        assert any(problem.startswith(start) for problem in problems), (start, problems)
