"""The Prometheus Operator's resources (kubernetes/prometheus-operator/) hold exactly what the
stack loads: the PrometheusRule's groups are those of alerts/*.rules.yml and pass promtool, the
dashboard ConfigMaps carry dashboards/*.json unchanged under the sidecar's label, and
`kubectl kustomize` builds the folder. Read from the committed files, not from the generator
(test_generated_files.py checks that they are current)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
FOLDER = REPO / "kubernetes" / "prometheus-operator"
KUBECTL = shutil.which("kubectl")
PROMTOOL = shutil.which("promtool")
# A ConfigMap holds at most 1 MiB (Kubernetes' ConfigMap concept page), and `kubectl apply`
# without --server-side copies the object into an annotation of at most 256 KiB.
ANNOTATION_LIMIT = 256 * 1024


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
    built = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    kinds = sorted(doc["kind"] for doc in built)
    dashboards = len(list((REPO / "dashboards").glob("*.json")))
    assert kinds == ["ConfigMap"] * dashboards + ["PrometheusRule"]
    assert _rule(built) == _rule(_documents("prometheusrule.yaml"))
