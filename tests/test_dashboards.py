"""The Grafana dashboards: conventions, every PromQL query and every variable returning data from
a real Prometheus after real traffic, every metric in the reference or recorded by the rules,
every LogQL query parsed by Grafana's own LogQL grammar."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests
import yaml
from conftest import start_exporter, start_prometheus, start_server

from alerts import rules
from dashboards.generate import DASHBOARDS_DIR, NO_PLACE_IN_LOGS, OUR_ALERTS_FIRING, render
from tools.metrics_reference import all_metric_names

REPO = Path(__file__).resolve().parents[1]
FLEET = Path(__file__).parent / "data" / "fake_fleet.json"
LEZER = REPO / ".cache" / "npm" / "node_modules" / "@grafana" / "lezer-logql"
# Where a series comes from, outermost first (issue 17's contract: in Kubernetes every series
# carries node and namespace from its pod, and cluster in a central store).
PLACE = ("cluster", "namespace", "node")
# The place the real-data test gives the exporter's series, as Kubernetes' relabelling (node,
# namespace) and a central store (cluster) would.
A_PLACE = {"cluster": "test-cluster", "namespace": "vigil-test", "node": "gpu-node-1"}
PROM_VARS = {
    "$cluster": ".*",
    "$namespace": ".*",
    "$node": ".*",
    "$instance": ".*",
    "$engine": ".*",
    "$model": ".*",
    "$gpu": ".*",
    "$__rate_interval": "1m",
}
# The boards whose engine-agnostic panels read the engine vocabulary (alerts/engines.py).
ENGINE_BOARDS = ("overview.json", "hang-forensics.json")
# Series only this project's inference process has (besides the vocabulary it feeds).
OWN_SERIES = (
    "inference_",
    "gen_ai_",
    "vigil_process_heartbeat_age_seconds",
    "vigil_process_unclean_exits",
)
# Panels that cannot have data in the real-traffic test, with the reason. Each must come back
# empty (or be taken off this list), and its query must return data once its series is swapped
# for a stand-in with the same labels: the filters and aggregation are exercised all the same.
EXPECTED_EMPTY = {
    ("overview.json", "KV-cache usage"): "no engine with a KV pool in this test",
    ("hang-forensics.json", "KV-cache usage"): "no engine with a KV pool in this test",
}
STAND_INS = {"vigil:engine_kv_cache_usage_ratio": "vigil:engine_requests_running"}
# Panels that have data only where series carry a place (Kubernetes), with the reason: each must
# come back empty from the Prometheus whose series have none, and with data from the other.
EMPTY_WITHOUT_PLACE = {
    ("fleet.json", "Alerts firing by node"): "it counts the alerts that carry a node",
}
# Another stack's alert in the same Prometheus, as kube-prometheus-stack's KubeNodeNotReady: it
# carries the place (the node) and no cause. The boards' alert panels must not count it.
FOREIGN_ALERT = "KubeNodeNotReady"
FOREIGN_RULES = f"""
groups:
  - name: another-stack
    rules:
      - alert: {FOREIGN_ALERT}
        expr: >-
          label_replace(max by (cluster, namespace) (vigil_exporter_build_info),
          "node", "{A_PLACE["node"]}", "", "")
        labels: {{severity: warning}}
"""
# A second cluster whose node, and exporter address (instance), have the same names as the first's,
# as in a central store (Mimir, Thanos) holding two clusters.
TWIN_CLUSTER = "twin-cluster"
LOKI_VARS = {
    "$service": "inference",
    "$level": "error",
    "$request_id": "",
    "$trace_id": "",
    "$__rate_interval": "1m",
}


def loki_all_values() -> dict[str, str]:
    """The Logs board's variables at All (the textboxes empty), as Grafana fills them in."""
    (board,) = [b for name, b in boards().items() if name == "logs.json"]
    values = {"$request_id": "", "$trace_id": "", "$__rate_interval": "1m"}
    for variable in board["templating"]["list"]:
        if variable.get("includeAll"):
            values["$" + variable["name"]] = variable["allValue"]
    return values


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


def recorded_names() -> set[str]:
    """The series the committed rule files record (Prometheus loads alerts/*.rules.yml)."""
    return {
        rule["record"]
        for path in sorted((REPO / "alerts").glob("*.rules.yml"))
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
        if "record" in rule
    }


def test_the_five_dashboards():
    # That the committed files are current: tests/test_generated_files.py.
    assert set(render()) == {
        "overview.json",
        "gpus.json",
        "hang-forensics.json",
        "logs.json",
        "fleet.json",
    }


def test_dashboard_conventions():
    uids = set()
    for name, board in boards().items():
        assert board["id"] is None and board["uid"] not in uids and "__inputs" not in board
        uids.add(board["uid"])
        variables = {v["name"]: v for v in board["templating"]["list"]}
        kinds = [v["query"] for v in variables.values() if v["type"] == "datasource"]
        assert len(kinds) == len(set(kinds)), f"{name}: one datasource variable per kind"
        if name != "fleet.json":  # the fleet board's rows are nodes
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


def place_of(board: dict) -> tuple[str, ...]:
    """The place variables of a board, in the order of PLACE."""
    names = {v["name"] for v in board["templating"]["list"]}
    return tuple(label for label in PLACE if label in names)


def selectors(expr: str) -> tuple[list[tuple[str, str]], set[str]]:
    """The vector selectors of a PromQL expression as (metric name or "", matchers), and the
    metric names it reads without braces (a selector with no matcher at all)."""
    expr = re.sub(r"\b(by|on|without|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    found = []
    for match in re.finditer(r"([a-zA-Z_:][a-zA-Z0-9_:]*)?\s*\{([^}]*)\}", expr):
        name = match.group(1) or ""
        found.append(("" if name in ("or", "and", "unless") else name, match.group(2)))
    bare = metric_names(re.sub(r"\{[^}]*\}", "", expr)) - {name for name, _ in found}
    return found, bare


def test_selectors_finds_every_vector_selector():
    found, bare = selectors(
        'sum by (a_b) (rate(x_y{p="1",q=~"$q"}[5m])) / c_d or {__name__=~"e_f|g_h",p="2"}'
    )
    assert found == [("x_y", 'p="1",q=~"$q"'), ("", '__name__=~"e_f|g_h",p="2"')]
    assert bare == {"c_d"}


def test_every_prometheus_board_chooses_its_place():
    """cluster, namespace and node (the fleet board: cluster and node, its series are per node)
    are query variables chained in that order before instance, each with All whose value .*
    also matches a series without the label: outside Kubernetes, where no series has one, the
    variables find nothing and stay at All, and the boards show what they show without them."""
    for name, board in boards().items():
        variables = board["templating"]["list"]
        by_name = {v["name"]: v for v in variables}
        place = place_of(board)
        assert place == (("cluster", "node") if name == "fleet.json" else PLACE), name
        prometheus_panels = [p for p in board["panels"] if p["datasource"]["type"] == "prometheus"]
        order = [v["name"] for v in variables]
        for index, label in enumerate(place):
            variable = by_name[label]
            where = f"{name}: {label}"
            assert variable["type"] == "query" and variable["includeAll"] and variable["multi"]
            assert variable["allValue"] == ".*" and re.fullmatch(variable["allValue"], ""), where
            assert variable["definition"].endswith(f", {label})"), where
            outer = place[:index]
            assert set(re.findall(r'(\w+)=~"\$(\w+)"', variable["definition"])) == {
                (o, o) for o in outer
            }, where
            assert order.index(label) == order.index("datasource") + 1 + index + (
                "loki_datasource" in order
            ), where
            # Shown where they filter panels; on the Logs board, hidden, they only carry the
            # choice from board to board (the links keep the variables).
            assert variable["hide"] == (0 if prometheus_panels else 2), where
        for variable in variables:
            if variable["type"] != "query" or variable["name"] in place:
                continue
            found, bare = selectors(variable["definition"])
            assert not bare and found, variable["definition"]
            for _series, matchers in found:
                for label in place:
                    assert f'{label}=~"${label}"' in matchers, (name, variable["name"])
    datasource = next(
        v for v in boards()["gpus.json"]["templating"]["list"] if v["name"] == "datasource"
    )
    # Grafana's default data source (kube-prometheus-stack's sidecar one, uid prometheus, is)
    assert datasource["current"]["value"] == "default"


def test_every_promql_query_is_filtered_by_the_place():
    """Every selector of every Prometheus query carries the board's place matchers, so that a
    node, namespace or cluster chosen narrows every panel."""
    checked = 0
    for name, panel, expr in queries("prometheus"):
        place = place_of(boards()[name])
        found, bare = selectors(expr)
        where = f"{name} / {panel['title']}: {expr}"
        assert found and not bare, where
        for _series, matchers in found:
            for label in place:
                assert f'{label}=~"${label}"' in matchers, where
            checked += 1
    assert checked > 60


def test_alert_panels_count_only_our_alerts():
    """Other stacks' alerts in a shared Prometheus (kube-prometheus-stack's KubeNodeNotReady
    carries node) are not ours: every ALERTS selector keeps the alerts with a cause, which every
    rule of ours has (and a rule added must have), and leaves out our always-firing Watchdog."""
    alerting = [
        rule
        for path in sorted((REPO / "alerts").glob("*.rules.yml"))
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    ]
    assert len(alerting) > 20
    for rule in alerting:
        assert rule["labels"].get("cause"), rule["alert"]
    assert {r["alert"] for r in alerting if r["labels"]["cause"] == "watchdog"} == {"Watchdog"}
    assert OUR_ALERTS_FIRING == 'alertstate="firing",cause!="",cause!="watchdog"'
    checked = 0
    for name, panel, expr in queries("prometheus"):
        for series, matchers in selectors(expr)[0]:
            if series == "ALERTS" or "ALERTS" in matchers:
                assert OUR_ALERTS_FIRING in matchers, f"{name} / {panel['title']}: {expr}"
                checked += 1
    assert checked == 3  # overview: Alerts firing now; fleet: Alerts firing (by node)


def joins(expr: str) -> list[tuple[str, list[str]]]:
    """The label lists of a PromQL expression's vector matchings and groupings, as (keyword,
    labels): on, ignoring, by, without (group_left/right name what they copy, not the match)."""
    return [
        (keyword, [label.strip() for label in labels.split(",") if label.strip()])
        for keyword, labels in re.findall(r"\b(on|ignoring|by|without)\s*\(([^)]*)\)", expr)
    ]


def test_every_join_on_an_instance_names_its_cluster():
    """The same node name, or exporter address (instance), can be in two clusters of a central
    store: a join on (instance, pid) finds both and fails as many-to-many, an aggregation by
    instance adds the two up. Every on (...) or by (...) that names instance names the board's
    place (cluster first); no join ignores cluster."""
    assert joins("a * on (instance, pid) group_left (state) sum by (x) (b) / ignoring (y) c") == [
        ("on", ["instance", "pid"]),
        ("by", ["x"]),
        ("ignoring", ["y"]),
    ]
    ons = 0
    for name, panel, expr in queries("prometheus"):
        place = set(place_of(boards()[name]))
        where = f"{name} / {panel['title']}: {expr}"
        for keyword, labels in joins(expr):
            assert keyword not in ("ignoring", "without") or "cluster" not in labels, where
            if keyword == "on" and "instance" in labels:
                assert place <= set(labels), where
                ons += 1
            if keyword == "by" and "instance" in labels:
                assert "cluster" in labels, where
    assert ons == 2  # hang-forensics: Engine processes


def test_log_panels_say_that_logs_carry_no_place():
    """Alloy labels log lines with service and level only (compose/alloy/config.alloy): no
    Loki query can choose a node, and each log panel, or the Logs board, says so."""
    alloy = (REPO / "compose" / "alloy" / "config.alloy").read_text()
    labels = set(re.findall(r'target_label\s*=\s*"(\w+)"', alloy))
    labels |= {
        label
        for block in re.findall(r"stage\.labels\s*\{\s*values\s*=\s*\{([^}]*)\}", alloy)
        for label in re.findall(r"(\w+)\s*=", block)
    }
    assert labels == {"service", "level"}, labels
    for name, panel, _expr in queries("loki"):
        board = boards()[name]
        assert NO_PLACE_IN_LOGS in panel["description"] + board["description"], panel["title"]


def test_every_variable_used_is_defined_on_its_board():
    """A $name Grafana cannot resolve stays in the query as text (a matcher on "$node" matches
    nothing): every variable a query, a variable or a link uses is one of the board's, or one of
    Grafana's own (__...)."""
    for name, board in boards().items():
        defined = {v["name"] for v in board["templating"]["list"]}
        texts = [v.get("definition", "") for v in board["templating"]["list"]]
        for panel in board["panels"]:
            texts += [target["expr"] for target in panel["targets"]]
            texts.append(json.dumps(panel["fieldConfig"]))
        used = {u for text in texts for u in re.findall(r"\$\{?(\w+)", text)}
        assert {u for u in used if not u.startswith("__")} <= defined, (name, used - defined)


def test_the_fleet_board_puts_the_worst_nodes_first_and_links_them():
    board = boards()["fleet.json"]
    panels = {p["title"]: p for p in board["panels"]}
    uids = {b["uid"]: b for b in boards().values()}
    worst_first = {
        "Hung engines by node": ("Hung", True),
        "Faulty GPUs by node": ("Faulty", True),
        "GPU memory headroom by node": ("Headroom", False),
        "Alerts firing by node": ("Alerts", True),
    }
    for title, (column, desc) in worst_first.items():
        panel = panels[title]
        assert panel["type"] == "table"
        assert panel["options"]["sortBy"] == [{"displayName": column, "desc": desc}], title
        # Grafana names an instant table's value "Value #<refId>" when the panel has more than
        # one query, else "Value": the columns renamed are the ones Grafana makes.
        refs = [t["refId"] for t in panel["targets"]]
        values = [f"Value #{r}" for r in refs] if len(refs) > 1 else ["Value"]
        (organize,) = [t for t in panel["transformations"] if t["id"] == "organize"]
        assert sorted(organize["options"]["renameByName"]) == sorted(values), title
        assert column in organize["options"]["renameByName"].values(), title
        assert all(t.get("format") == "table" and t["instant"] for t in panel["targets"])
        (override,) = panel["fieldConfig"]["overrides"]
        assert override["matcher"] == {"id": "byName", "options": "node"}, title
        (links,) = [p["value"] for p in override["properties"] if p["id"] == "links"]
        assert links, title
        for link in links:
            target_uid, query = re.fullmatch(r"/d/([\w-]+)\?(.*)", link["url"]).groups()
            target = {v["name"] for v in uids[target_uid]["templating"]["list"]}
            params = re.findall(r"var-(\w+)=", query) + re.findall(r"\$\{(\w+):queryparam\}", query)
            assert set(params) == {"datasource", "cluster", "node"} <= target, link
            assert "var-node=${__value.raw}" in query and "${__url_time_range}" in query
    stats = {t for t, p in panels.items() if p["type"] == "stat"}
    assert {"Nodes", "GPUs", "Faulty GPUs", "Hung engines", "Alerts firing"} <= stats
    read = set().union(
        *(metric_names(e) for _b, _p, e in queries("prometheus") if _b == "fleet.json")
    )
    assert read == {
        "vigil:node_gpus",
        "vigil:node_gpus_unhealthy",
        "vigil:node_gpu_memory_headroom_ratio",
        "vigil:node_engines",
        "vigil:node_engines_hung",
        "ALERTS",
    }


def test_the_engine_boards_hold_for_every_engine():
    """Overview and Hang forensics choose engines and read the vocabulary for their
    engine-agnostic panels; a panel on this project's own series says that only engine vigil
    fills it, one on the processes seen from /proc that other engines' appear there too."""
    for name in ENGINE_BOARDS:
        board = boards()[name]
        variables = {v["name"]: v for v in board["templating"]["list"]}
        engine = variables["engine"]
        # the engines on the places and instances chosen
        assert re.fullmatch(
            r'label_values\(vigil:engine_requests_running\{[^}]*instance=~"\$instance"\}, engine\)',
            engine["definition"],
        ), engine["definition"]
        assert engine["multi"] and engine["includeAll"] and engine["allValue"] == ".*"
        names = [v["name"] for v in board["templating"]["list"]]
        assert names.index("instance") < names.index("engine") < names.index("model"), names
        vocabulary = 0
        for panel in board["panels"]:
            where = f"{name} / {panel['title']}"
            exprs = [target["expr"] for target in panel["targets"]]
            read = set().union(*(metric_names(expr) for expr in exprs))
            if any(n.startswith("vigil:engine_") for n in read):
                vocabulary += 1
                for expr in exprs:
                    if "vigil:engine_" in expr:
                        assert 'engine=~"$engine"' in expr, where
                        assert not re.search(r"vigil:engine_\w*:rate\w*\{[^}]*\}\[", expr), where
            own = any(n.startswith(OWN_SERIES) for n in read) or any(
                'service="inference"' in expr for expr in exprs
            )
            if own:
                assert "(engine vigil)" in panel["description"], where
            process = any(
                n.startswith("vigil_process_") and not n.startswith(OWN_SERIES) for n in read
            )
            if process and "vigil_engine_process_info" not in read:  # that one is every engine's
                assert "Other engines' processes" in panel["description"], where
        assert vocabulary >= 2, name
    overview = {p["title"] for p in boards()["overview.json"]["panels"]}
    assert {
        "In flight",
        "Request and error rates",
        "Time to first token",
        "Inter-token latency",
        "Request duration",
        "Generated tokens per second",
        "Progress",
        "KV-cache usage",
        "Requests running and waiting",
    } <= overview
    hang = {p["title"] for p in boards()["hang-forensics.json"]["panels"]}
    assert {"Progress against pending work", "Engine processes", "KV-cache usage"} <= hang


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (label matchers and groupings removed; the
    names a ``__name__`` matcher lists, recorded names with their colons included)."""
    named = {
        name for pattern in re.findall(r'__name__=~?"([^"]*)"', expr) for name in pattern.split("|")
    }
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\b(by|on|without|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    functions = {"histogram_quantile", "sort_desc", "label_values"}
    return named | {
        w
        for w in re.findall(r"(?<![\w:])[a-zA-Z_:][a-zA-Z0-9_:]*(?![\w:])", expr)
        if ("_" in w or w.isupper()) and w not in functions
    }


def test_every_metric_used_is_in_the_reference():
    known = all_metric_names() | recorded_names() | {"ALERTS"}
    for _board, panel, expr in queries("prometheus"):
        assert metric_names(expr) - known == set(), (panel["title"], metric_names(expr) - known)
    for board in boards().values():
        for variable in board["templating"]["list"]:
            if variable["type"] == "query":
                assert metric_names(variable["definition"]) - known == set(), variable["name"]
    assert metric_names('sum by (le) (rate(a_b_bucket{x="y"}[1m])) / c_d') == {"a_b_bucket", "c_d"}
    assert metric_names(
        'sum by (m) (vigil:e_f:rate1m{m=~"$m"}) + a_b * on (p) group_left (s) c_d'
    ) == {"vigil:e_f:rate1m", "a_b", "c_d"}
    assert metric_names("vigil:e_f:rate1m + a_b") == {"vigil:e_f:rate1m", "a_b"}
    assert metric_names('label_values({__name__=~"a_b|vigil:c_d"}, instance)') == {
        "a_b",
        "vigil:c_d",
    }


def test_every_logql_query_parses():
    node = shutil.which("node")
    if node is None or not LEZER.exists():
        pytest.skip("node or @grafana/lezer-logql missing (scripts/test installs it with npm)")
    found = list(queries("loki")) * 2
    half = len(found) // 2
    exprs = [  # with one value chosen, then with All
        substitute(expr, LOKI_VARS if index < half else loki_all_values())
        for index, (_b, _p, expr) in enumerate(found)
    ]
    assert half >= 4
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


def test_the_logs_board_all_level_includes_lines_without_a_level():
    """A line without a level label (shipped before Alloy gave every line one, or by another
    agent) is still among All's lines: Loki compares an absent label as the empty string, so
    All's regex must match "". Every selector keeps a matcher that does not match "" (Loki
    refuses one without), and every level Alloy gives is offered."""
    (board,) = [b for name, b in boards().items() if name == "logs.json"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    level = variables["level"]
    assert level["includeAll"] and level["multi"]
    assert re.fullmatch(level["allValue"], "")
    offered = level["query"].split(",")
    assert {"error", "unknown", "warning", "warn"} <= set(offered)
    assert all(re.fullmatch(level["allValue"], value) for value in offered)
    assert not re.fullmatch(variables["service"]["allValue"], "")
    for _board, panel, expr in queries("loki"):
        filled = substitute(expr, loki_all_values())
        selector = re.search(r"\{([^}]*)\}", filled).group(1)
        matchers = re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', selector)
        assert any(
            (op == "=" and value != "") or (op == "=~" and not re.fullmatch(value, ""))
            for _name, op, value in matchers
        ), (panel["title"], selector)


def test_request_lines_are_found_by_their_event_not_their_message():
    """A request's last line is "request finished", "request rejected: ..." or "request failed:
    ..."; its event field (request_end) is the same for all, so one filter finds slow and failed
    requests alike."""
    exprs = [expr for _board, _panel, expr in queries("loki")]
    assert not [e for e in exprs if "request finished" in e or "request failed" in e]
    (slow_or_failed,) = [
        expr
        for _board, panel, expr in queries("loki")
        if panel["title"] == "Slow or failed requests"
    ]
    assert 'event = "request_end"' in slow_or_failed
    assert "duration_s >" in slow_or_failed and "status >= 500" in slow_or_failed


def image_message(colour: str) -> list[dict]:
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (540, 1200), colour).save(buffer, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what?"}]


def prometheus_config(
    rules: Path, exporter: str, places: list[dict[str, str] | None], foreign_rules: Path
) -> str:
    """Scrape the exporter every second with the shipped rules and another stack's; once per
    place, whose labels its series carry, as Kubernetes' relabelling gives node and namespace and
    a central store cluster (a relabel rule without source labels sets its target label to its
    replacement). Two places: two clusters' copies of the same exporter, node and instance."""
    jobs = []
    for index, place in enumerate(places):
        relabel = ", ".join(
            f"{{target_label: {label}, replacement: {value}}}"
            for label, value in (place or {}).items()
        )
        jobs.append(f"""
  - job_name: vigil-exporter-{index}
    static_configs: [{{targets: ["{exporter}"]}}]
    relabel_configs: [{relabel}]""")
    return f"""
global: {{scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}}
rule_files: ["{rules}/*.rules.yml", "{foreign_rules}"]
scrape_configs:{"".join(jobs)}
"""


def query_at(prometheus, expr: str, at: float) -> list[dict]:
    """An instant query at ``at``: two queries at the same time see the same alerts."""
    response = requests.get(
        prometheus.base_url + "/api/v1/query", params={"query": expr, "time": at}, timeout=10
    )
    response.raise_for_status()
    return sorted(response.json()["data"]["result"], key=lambda r: sorted(r["metric"].items()))


def alert_panels_count_only_ours(prometheus, values: dict[str, str]) -> list[str]:
    """What is wrong with the alert panels on ``prometheus``: each must give what the same query
    gives with our alerts named otherwise (neither the foreign alert nor the Watchdog), and not
    what it gives with every alert (the foreign alert is firing there)."""
    wrong = []
    at = time.time() - 3  # the rules evaluated up to then are written
    others = f'alertname!~"{FOREIGN_ALERT}|Watchdog"'
    for board, panel, expr in queries("prometheus"):
        if "ALERTS" not in expr:
            continue
        where = f"{board} / {panel['title']}: {expr}"
        got = query_at(prometheus, substitute(expr, values), at)
        for name, matchers in (("by name", others), ("every alert", "")):
            alternative = expr.replace(
                OUR_ALERTS_FIRING, ",".join(m for m in ('alertstate="firing"', matchers) if m)
            )
            assert alternative != expr, where
            same = got == query_at(prometheus, substitute(alternative, values), at)
            if same != (name == "by name"):
                wrong.append(f"{'not ' if not same else ''}the same as {name}: {where}: {got}")
    return wrong


def empty_queries(prometheus, values: dict[str, str], without_place: bool) -> list[str]:
    """What is wrong with the boards' queries on ``prometheus`` with ``values`` for the
    variables: a query without data, or one listed as empty that has data (listed in
    EXPECTED_EMPTY, or in EMPTY_WITHOUT_PLACE when the series carry no place)."""
    import torch

    wrong = []
    cuda = torch.cuda.is_available()
    for board, panel, expr in queries("prometheus"):
        if "cuda-only" in panel.get("tags", []) and not cuda:
            continue
        where = f"{board} / {panel['title']}: {expr}"
        result = prometheus.query(substitute(expr, values))  # a bad query raises here
        reason = EXPECTED_EMPTY.get((board, panel["title"]))
        if reason is None and without_place:
            reason = EMPTY_WITHOUT_PLACE.get((board, panel["title"]))
        if reason is None:
            if not result:
                wrong.append(f"without data: {where}")
            continue
        if result:
            wrong.append(f"listed as empty ({reason}), yet with data: {where}")
        if (board, panel["title"]) in EMPTY_WITHOUT_PLACE:
            continue
        swapped = expr
        for series, stand_in in STAND_INS.items():
            swapped = swapped.replace(series, stand_in)
        assert swapped != expr, f"{where}: no stand-in for its series"
        if not prometheus.query(substitute(swapped, values)):
            wrong.append(f"empty with a stand-in series: {where}")
    return wrong


def variable_values(prometheus, values: dict[str, str]) -> dict[tuple[str, str], set[str]]:
    """(board, variable) -> the values of every query variable (label_values(selector, label)
    as a PromQL count)."""
    found = {}
    for name, board in boards().items():
        for variable in board["templating"]["list"]:
            if variable["type"] != "query":
                continue
            selector, label = re.fullmatch(
                r"label_values\((.+), (\w+)\)", variable["definition"]
            ).groups()
            query = substitute(f"count by ({label}) ({selector})", values)
            got = {r["metric"].get(label) for r in prometheus.query(query)}
            found[(name, variable["name"])] = got - {None, ""}
    return found


def test_every_promql_query_returns_data_after_real_traffic(tmp_path, demo_dir):
    """Real traffic on two servers, one exporter, and two Prometheus scraping it: one as
    outside Kubernetes (no series has a cluster, namespace or node), one whose series carry a
    place. Every query of every board returns data from both with the variables at All, and
    from the second with its place chosen; every query variable has values, except the place
    variables outside Kubernetes, which have none (and stay at All in Grafana)."""
    server = start_server(tmp_path, demo_dir, "--enable-fault-injection")
    vision_dir = tmp_path / "vision"
    vision_dir.mkdir()
    vision = start_server(
        vision_dir, demo_dir, "--state-dir", str(server.state_dir), model="demo-vl"
    )
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
    started = []
    foreign_rules = tmp_path / "another-stack.rules.yml"
    foreign_rules.write_text(FOREIGN_RULES)
    # The shipped rules at this test's 1 s cadence (each rule group carries its interval).
    rules_dir = rules.write(tmp_path / "rules", {"evaluation_interval": "1s"})
    twin_place = A_PLACE | {"cluster": TWIN_CLUSTER}
    try:
        for directory, places in (
            ("plain", [None]),
            ("placed", [A_PLACE]),
            ("two-clusters", [A_PLACE, twin_place]),
        ):
            (tmp_path / directory).mkdir()
            config = prometheus_config(
                rules_dir, exporter.base_url.removeprefix("http://"), places, foreign_rules
            )
            started.append(start_prometheus(tmp_path / directory, config))
        plain, placed, two_clusters = started
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
        # The vision-language server beside it, in the same state directory: the image panels.
        for colour in ("red", "blue", "green"):
            assert (
                requests.post(
                    vision.url("/v1/chat/completions"),
                    timeout=60,
                    json={
                        "model": "demo-vl",
                        "max_tokens": 4,
                        "messages": [{"role": "user", "content": image_message(colour)}],
                    },
                ).status_code
                == 200
            )
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
        for prometheus in started:
            prometheus.wait_for("count(inference_empty_outputs_total)", lambda v: v is not None)
            prometheus.wait_for("count(vigil_gpu_xid_errors_total)", lambda v: v is not None)
            # The vocabulary our own process feeds (the rules evaluate every second).
            for series in ("vigil:engine_request_errors:rate5m", "vigil:engine_progress:rate1m"):
                prometheus.wait_for(f'count({series}{{engine="vigil"}})', lambda v: v is not None)
            prometheus.wait_for("count(vigil_engine_process_info)", lambda v: v is not None)
            prometheus.wait_for("count(vigil:node_engines_hung)", lambda v: v is not None)
        for prometheus in started:
            prometheus.wait_for(
                f'count(ALERTS{{alertstate="firing",alertname="{FOREIGN_ALERT}"}})',
                lambda v: v is not None,
            )
        placed.wait_for(f'count(ALERTS{{{OUR_ALERTS_FIRING},node!=""}})', lambda v: v is not None)
        time.sleep(3)
        chosen = PROM_VARS | {f"${label}": value for label, value in A_PLACE.items()}
        passes = (
            ("outside Kubernetes, at All", plain, PROM_VARS, True),
            ("with a place, at All", placed, PROM_VARS, False),
            ("with a place, chosen", placed, chosen, False),
        )
        wrong = []
        for what, prometheus, values, without_place in passes:
            wrong += [f"{what}: {w}" for w in empty_queries(prometheus, values, without_place)]
        for what, prometheus, values, _without_place in passes:
            wrong += [f"{what}: {w}" for w in alert_panels_count_only_ours(prometheus, values)]
        # Two clusters with the same node and instance names: every query runs (a join that
        # finds both clusters' series fails as many-to-many), every row naming an instance names
        # its cluster, and both clusters' rows are there.
        clusters_seen = set()
        for board, panel, expr in queries("prometheus"):
            where = f"two clusters: {board} / {panel['title']}: {expr}"
            try:
                result = two_clusters.query(substitute(expr, PROM_VARS))
            except requests.HTTPError as error:
                wrong.append(f"{where}: {error.response.text}")
                continue
            for row in result:
                if "instance" in row["metric"]:
                    clusters_seen.add((board, panel["title"], row["metric"].get("cluster")))
                    if "cluster" not in row["metric"]:
                        wrong.append(f"{where}: an instance without its cluster: {row['metric']}")
        assert wrong == [], "\n".join(wrong)
        processes = {c for _b, t, c in clusters_seen if t == "Engine processes"}
        assert processes == {A_PLACE["cluster"], TWIN_CLUSTER}, processes
        seen = {(board, panel["title"]) for board, panel, _expr in queries("prometheus")}
        assert set(EXPECTED_EMPTY) | set(EMPTY_WITHOUT_PLACE) <= seen
        # Every query variable has values; outside Kubernetes the place variables have none.
        for what, prometheus, values, without_place in passes:
            for (name, variable), got in variable_values(prometheus, values).items():
                where = f"{what}: {name}: variable {variable}: {got}"
                if variable in PLACE:
                    assert got == (set() if without_place else {A_PLACE[variable]}), where
                else:
                    assert got, where
                if variable == "engine":
                    assert "vigil" in got, where
    finally:
        for prometheus in started:
            prometheus.stop()
        exporter.stop()
        server.stop()
        vision.stop()
