"""The Grafana dashboards: conventions, every PromQL query returning data from a real Prometheus
after real traffic, every metric in the reference, every LogQL query parsed by Grafana's own
LogQL grammar."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests
from conftest import start_exporter, start_prometheus, start_server

from dashboards.generate import DASHBOARDS_DIR, render
from tools.metrics_reference import all_metric_names

REPO = Path(__file__).resolve().parents[1]
FLEET = Path(__file__).parent / "data" / "fake_fleet.json"
LEZER = REPO / ".cache" / "npm" / "node_modules" / "@grafana" / "lezer-logql"
PROM_VARS = {"$instance": ".*", "$model": ".*", "$gpu": ".*", "$__rate_interval": "1m"}
LOKI_VARS = {
    "$service": "inference",
    "$level": "error",
    "$request_id": "",
    "$trace_id": "",
    "$__rate_interval": "1m",
}


def boards() -> dict[str, dict]:
    return {
        path.name: json.loads(path.read_text()) for path in sorted(DASHBOARDS_DIR.glob("*.json"))
    }


def queries(kind: str):
    """(board, panel, expr) for every target whose datasource is of ``kind``."""
    for name, board in boards().items():
        for panel in board["panels"]:
            for target in panel["targets"]:
                if target["datasource"]["type"] == kind:
                    yield name, panel, target["expr"]


def substitute(expr: str, values: dict[str, str]) -> str:
    for variable, value in sorted(values.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"an unknown variable in {expr}"
    return expr


def test_the_four_dashboards():
    # That the committed files are current: tests/test_generated_files.py.
    assert set(render()) == {"overview.json", "gpus.json", "hang-forensics.json", "logs.json"}


def test_dashboard_conventions():
    uids = set()
    for name, board in boards().items():
        assert board["id"] is None and board["uid"] not in uids and "__inputs" not in board
        uids.add(board["uid"])
        variables = {v["name"]: v for v in board["templating"]["list"]}
        kinds = [v["query"] for v in variables.values() if v["type"] == "datasource"]
        assert len(kinds) == len(set(kinds)), f"{name}: one datasource variable per kind"
        assert {"instance", "model"} <= set(variables), name
        for panel in board["panels"]:
            where = f"{name} / {panel['title']}"
            assert panel["description"], where
            assert panel["fieldConfig"]["defaults"]["unit"], where
            uid = panel["datasource"]["uid"]
            assert uid.startswith("${") and uid[2:-1] in variables, where
            for target in panel["targets"]:
                for call in re.findall(r"(?:rate|increase)\([^\[]*\[([^\]]*)\]", target["expr"]):
                    assert call == "$__rate_interval", f"{where}: [{call}]"
    gpu_board = boards()["gpus.json"]
    assert "gpu" in {v["name"] for v in gpu_board["templating"]["list"]}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (label matchers and groupings removed)."""
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\b(by|on|without|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    functions = {"histogram_quantile", "sort_desc", "label_values"}
    return {
        w
        for w in re.findall(r"\b[a-zA-Z_][a-zA-Z0-9_]*\b", expr)
        if ("_" in w or w.isupper()) and w not in functions
    }


def test_every_metric_used_is_in_the_reference():
    known = all_metric_names() | {"ALERTS"}
    for _board, panel, expr in queries("prometheus"):
        assert metric_names(expr) - known == set(), (panel["title"], metric_names(expr) - known)
    for board in boards().values():
        for variable in board["templating"]["list"]:
            if variable["type"] == "query":
                assert metric_names(variable["definition"]) - known == set(), variable["name"]
    assert metric_names('sum by (le) (rate(a_b_bucket{x="y"}[1m])) / c_d') == {"a_b_bucket", "c_d"}


def test_every_logql_query_parses():
    node = shutil.which("node")
    if node is None or not LEZER.exists():
        pytest.skip("node or @grafana/lezer-logql missing (scripts/test installs it with npm)")
    found = list(queries("loki"))
    exprs = [substitute(expr, LOKI_VARS) for _b, _p, expr in found]
    assert len(exprs) >= 4
    result = subprocess.run(
        [node, str(Path(__file__).parent / "logql_parse.cjs"), str(LEZER)],
        input=json.dumps(exprs),
        capture_output=True,
        text=True,
        check=True,
    )
    errors = json.loads(result.stdout)
    bad = [
        (p["title"], e, at)
        for (_b, p, _), e, at in zip(found, exprs, errors, strict=True)
        if at is not None
    ]
    assert bad == []
    # and the checker does catch a broken one
    broken = subprocess.run(
        [node, str(Path(__file__).parent / "logql_parse.cjs"), str(LEZER)],
        input=json.dumps(['{service="x"} | json | | status']),
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(broken.stdout) != [None]


def test_every_promql_query_returns_data_after_real_traffic(tmp_path, demo_dir):
    import torch

    server = start_server(tmp_path, demo_dir, "--enable-fault-injection")
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
        "1",
        "--canary-interval",
        "2",
    )
    rules = REPO / "alerts"
    prometheus = start_prometheus(
        tmp_path,
        f"""
global: {{scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}}
rule_files: ["{rules}/*.rules.yml"]
scrape_configs:
  - job_name: vigil-exporter
    static_configs: [{{targets: ["{exporter.base_url.removeprefix("http://")}"]}}]
""",
    )
    try:
        url = server.url("/v1/completions")
        for index in range(6):
            assert (
                requests.post(
                    url,
                    timeout=60,
                    json={
                        "model": "demo",
                        "prompt": f"hello {index}",
                        "max_tokens": 8,
                        "stream": index % 2 == 0,
                    },
                ).status_code
                == 200
            )
        assert requests.post(url, timeout=60, json={"model": "demo"}).status_code == 400
        requests.post(server.url("/debug/fault"), timeout=10, json={"fault": "empty"})
        requests.post(url, timeout=60, json={"model": "demo", "prompt": "e", "max_tokens": 4})
        requests.post(
            server.url("/debug/fault"), timeout=10, json={"fault": "oom", "stage": "decode"}
        )
        assert (
            requests.post(
                url, timeout=60, json={"model": "demo", "prompt": "o", "max_tokens": 4}
            ).status_code
            == 503
        )
        prometheus.wait_for("count(inference_empty_outputs_total)", lambda v: v is not None)
        prometheus.wait_for("count(vigil_gpu_xid_errors_total)", lambda v: v is not None)
        time.sleep(3)
        empty = []
        cuda = torch.cuda.is_available()
        for board, panel, expr in queries("prometheus"):
            if "cuda-only" in panel.get("tags", []) and not cuda:
                continue
            result = prometheus.query(substitute(expr, PROM_VARS))
            if not result:
                empty.append(f"{board} / {panel['title']}: {expr}")
        assert empty == [], "queries without data:\n" + "\n".join(empty)
    finally:
        prometheus.stop()
        exporter.stop()
        server.stop()
