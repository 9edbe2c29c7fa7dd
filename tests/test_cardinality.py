"""The cardinality budget of one GPU node (docs/cardinality.md): 8 GPUs and 2 engines, measured
for real and held under the figures the doc states, per source and in total; and no label whose
values grow with the requests served (a request id, a prompt, a per-request pid as a label).

The node: two of our inference processes (models glm-a and glm-b, one state directory, as two
4-GPU replicas on an 8-GPU node), the exporter reading that directory and the 8 GPUs (the fake
backend, 8 copies of the fully featured H100 of tests/data/fake_fleet.json, each reporting the
process of its replica), probing both with the canary on, and a real Prometheus scraping the
exporter (alerts/prometheus.yml's one job) with every rule file of alerts/ loaded. Sources:
- the exporter's /metrics (what Prometheus scrapes from the node);
- the series Prometheus adds per scrape target (up, scrape_*);
- the recording rules' output, {__name__=~"vigil:.+"};
- the alert series, ALERTS and ALERTS_FOR_STATE (the fake H100s run hot: some alerts are on);
- the engines' own /metrics: our processes' are NOT scraped (the exporter republishes them from
  the state directory), so they are measured and held to a budget of their own but left out
  of the node's total; with vLLM or SGLang that source is the engine's, not ours to bound.

Run `pytest -s tests/test_cardinality.py` to see the table."""

from __future__ import annotations

import copy
import json
import re
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from conftest import REPO, start_exporter, start_prometheus, start_server
from prometheus_client.parser import text_string_to_metric_families

from alerts import rules

EXPORTER_JOB = rules.PARAMETERS["exporter_job"].default

DOC = REPO / "docs" / "cardinality.md"
FLEET = REPO / "tests" / "data" / "fake_fleet.json"
MODELS = ("glm-a", "glm-b")
GPUS = 8
SOURCES = {  # the first cell of each row of the doc's budget table
    "exporter": "exporter /metrics",
    "scrape": "per-target series (up, scrape_*)",
    "recorded": "recording rules (vigil:*)",
    "alerts": "ALERTS, ALERTS_FOR_STATE",
    "total": "total per node",
    "engines": "our engines' own /metrics (not scraped)",
}
Series = frozenset  # of (name, ((label, value), ...)) pairs


def budget() -> dict[str, int]:
    """The budget column of the doc's table (the doc is the one place the figures live)."""
    found = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        for key, title in SOURCES.items():
            if cells and cells[0] == title:
                found[key] = int(cells[-1].replace(",", ""))
    missing = set(SOURCES) - set(found)
    assert not missing, f"{DOC.relative_to(REPO)} has no budget row for {sorted(missing)}"
    return found


def _fleet(path: Path, pids: list[int]) -> Path:
    spec = json.loads(FLEET.read_text())
    h100 = spec["gpus"][0]
    gpus = []
    for index in range(GPUS):
        gpu = copy.deepcopy(h100)
        gpu["uuid"] = f"GPU-{index:08x}-0000-4000-8000-000000000000"
        gpu.pop("xids", None)  # an XID is an event, not part of the steady state
        replica = pids[index * len(pids) // GPUS]
        gpu["processes"] = [{"pid": replica, "used_memory_bytes": 70_000_000_000}]
        gpus.append(gpu)
    spec["gpus"] = gpus
    path.write_text(json.dumps(spec))
    return path


def _series(text: str) -> Series:
    return frozenset(
        (sample.name, tuple(sorted(sample.labels.items())))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    )


def _time(text: str) -> float:
    """Prometheus's RFC 3339 timestamps carry nanoseconds; Python reads microseconds."""
    text = re.sub(r"(\.\d{6})\d+", r"\1", text).replace("Z", "+00:00")
    return datetime.fromisoformat(text).timestamp()


class Node:
    def __init__(self, tmp: Path, demo_dir: str):
        self.parts: list[Any] = []
        self.tmp = tmp
        first, second = tmp / "engine-a", tmp / "engine-b"
        first.mkdir()
        second.mkdir()
        a = self._keep(start_server(first, demo_dir, "--served-model-name", MODELS[0]))
        b = self._keep(
            start_server(
                second, demo_dir, "--served-model-name", MODELS[1], "--state-dir", str(a.state_dir)
            )
        )
        self.engines = [a, b]
        fleet = _fleet(tmp / "fleet.json", [a.process.pid, b.process.pid])
        self.exporter = self._keep(
            start_exporter(
                tmp,
                a.state_dir,
                "--target",
                a.base_url,
                "--target",
                b.base_url,
                "--gpu-backend",
                "fake",
                "--fake-gpu-fleet",
                str(fleet),
                "--gpu-interval",
                "0.5",
                "--probe-interval",
                "1",
                "--canary-interval",
                "2",
            )
        )
        address = self.exporter.base_url.removeprefix("http://")
        (tmp / "prometheus").mkdir()
        # The shipped rules at this Prometheus's 1 s cadence (each group carries its interval):
        # the same series, recorded and alerting, within seconds instead of minutes.
        rules_dir = rules.write(tmp / "rules", {"evaluation_interval": "1s"})
        # The exporter's jobs as alerts/prometheus.yml ships them (the normal one, and the fast
        # one for the hang series, each series stored once), pointed at this exporter, with the
        # normal job at 1 s like the rules.
        shipped = yaml.safe_load((REPO / "alerts" / "prometheus.yml").read_text())
        jobs = [j for j in shipped["scrape_configs"] if j["job_name"].startswith(EXPORTER_JOB)]
        assert len(jobs) == 2, [j["job_name"] for j in jobs]
        for job in jobs:
            job["static_configs"] = [{"targets": [address]}]
        config = {
            "global": {
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "evaluation_interval": "1s",
            },
            "rule_files": [f"{rules_dir}/*.rules.yml"],
            "scrape_configs": jobs,
        }
        self.prometheus = self._keep(start_prometheus(tmp / "prometheus", yaml.safe_dump(config)))
        self.sent = 0

    def _keep(self, part):
        self.parts.append(part)
        return part

    def stop(self) -> None:
        for part in reversed(self.parts):
            part.stop()

    def traffic(self, rounds: int) -> None:
        """Each round, on each engine: a completion and a streamed one, a chat completion, a
        bad request (400) and one for a model it does not serve (404); every prompt and
        max_tokens new, so that a label taken from a request would show."""
        for engine, model in zip(self.engines, MODELS, strict=True):
            for _ in range(rounds):
                self.sent += 1
                n = self.sent
                for body, path, expected in (
                    ({"prompt": f"p{n}", "max_tokens": 1 + n % 7}, "completions", 200),
                    ({"prompt": f"s{n}", "max_tokens": 2, "stream": True}, "completions", 200),
                    (
                        {"messages": [{"role": "user", "content": f"c{n}"}], "max_tokens": 3},
                        "chat/completions",
                        200,
                    ),
                    ({"max_tokens": 2}, "completions", 400),
                ):
                    answer = requests.post(
                        engine.url(f"/v1/{path}"), json={"model": model, **body}, timeout=60
                    )
                    assert answer.status_code == expected, answer.text
                    answer.close()
                missing = requests.post(
                    engine.url("/v1/completions"),
                    json={"model": f"nope-{n}", "prompt": "x", "max_tokens": 1},
                    timeout=60,
                )
                assert missing.status_code == 404, missing.text

    def _settled(self, after: float) -> None:
        """Prometheus has scraped the exporter at least five times, once after ``after``, and
        evaluated every rule group after that scrape."""

        def scraped() -> float | None:
            targets = requests.get(self.prometheus.base_url + "/api/v1/targets", timeout=10)
            active = targets.json()["data"]["activeTargets"]
            if not active:  # not discovered yet
                return None
            if len(active) < 2 or any(t["health"] != "up" for t in active):
                return None
            when = min(_time(t["lastScrape"]) for t in active)  # both jobs scraped since
            return when if when > after else None

        def evaluated(since: float) -> bool:
            rules = requests.get(self.prometheus.base_url + "/api/v1/rules", timeout=10)
            groups = rules.json()["data"]["groups"]
            return bool(groups) and all(_time(g["lastEvaluation"]) > since for g in groups)

        # Rates and quantiles need two samples in their window: five scrapes first.
        self.prometheus.wait_for(
            'count_over_time(up{job="vigil-exporter"}[1m])', lambda v: v is not None and v >= 5
        )
        deadline = time.monotonic() + 60
        while (scrape := scraped()) is None:
            assert time.monotonic() < deadline, "Prometheus never scraped the exporter"
            time.sleep(0.2)
        while not evaluated(scrape):
            assert time.monotonic() < deadline, "the rules were never evaluated"
            time.sleep(0.2)
        # The alert series are stored from the evaluations: the Watchdog, which always fires,
        # says they are there.
        self.prometheus.wait_for('ALERTS{alertname="Watchdog"}', lambda v: v == 1)

    def measure(self) -> dict[str, Series]:
        exporter = _series(self.exporter.metrics_text())
        engines = frozenset().union(*(_series(e.metrics_text()) for e in self.engines))
        self._settled(time.time())

        def stored(expr: str) -> Series:
            return frozenset(
                (r["metric"]["__name__"], tuple(sorted(r["metric"].items())))
                for r in self.prometheus.query(expr)
            )

        return {
            "exporter": exporter,
            "scrape": stored(f'{{job=~"{EXPORTER_JOB}.*", __name__=~"up|scrape_.+"}}'),
            "recorded": stored('{__name__=~"vigil:.+"}'),
            "alerts": stored('{__name__=~"ALERTS|ALERTS_FOR_STATE"}'),
            "engines": engines,
        }


@pytest.fixture(scope="module")
def node(tmp_path_factory, demo_dir):
    started = Node(tmp_path_factory.mktemp("node"), demo_dir)
    try:
        started.traffic(rounds=3)  # every kind of request met once before anything is counted
        yield started
    finally:
        started.stop()


def _counts(measured: dict[str, Series]) -> dict[str, int]:
    counts = {key: len(series) for key, series in measured.items()}
    counts["total"] = sum(counts[k] for k in ("exporter", "scrape", "recorded", "alerts"))
    return counts


def _table(counts: dict[str, int], limits: dict[str, int]) -> str:
    width = max(len(t) for t in SOURCES.values())
    lines = [f"{'source':<{width}}  {'measured':>8}  {'budget':>6}"]
    for key, title in SOURCES.items():
        lines.append(f"{title:<{width}}  {counts[key]:>8,}  {limits[key]:>6,}")
    return "\n".join(lines)


def _by_name(series: Series) -> dict[str, int]:
    names: dict[str, int] = defaultdict(int)
    for name, _ in series:
        names[name] += 1
    return dict(sorted(names.items(), key=lambda item: -item[1]))


def test_one_node_stays_within_the_budget(node):
    measured = node.measure()
    counts, limits = _counts(measured), budget()
    alerts = sorted({dict(labels)["alertname"] for _, labels in measured["alerts"]})
    print(f"\nseries of one node ({GPUS} GPUs, {len(MODELS)} engines):\n" + _table(counts, limits))
    print("alerts pending or firing:", ", ".join(alerts))
    over = [key for key in SOURCES if counts[key] > limits[key]]
    assert not over, (
        f"over the budget of {DOC.relative_to(REPO)}: {over}\n{_table(counts, limits)}\n"
        "largest families: "
        + ", ".join(
            f"{name} {n}"
            for key in over
            if key != "total"
            for name, n in list(_by_name(measured[key]).items())[:8]
        )  # fmt: skip
    )
    # The node is what it claims: every GPU and both engines are in what was counted.
    gpus = {dict(labels).get("uuid") for name, labels in measured["exporter"]}
    assert len(gpus - {None}) == GPUS, gpus
    for model in MODELS:
        assert any(("model", model) in labels for _, labels in measured["recorded"]), model


def _values_by_label(series: Series) -> dict[str, set[str]]:
    values: dict[str, set[str]] = defaultdict(set)
    for _, labels in series:
        for label, value in labels:
            values[label].add(value)
    return values


def test_no_label_grows_with_the_requests_served(node):
    """Twice as many requests again as every kind has already been seen: no source gains a
    series, and no label a value. A label with one value per request, prompt, client or pid of a
    short-lived worker fails here; histogram buckets exist from a child's first observation."""
    before = node.measure()
    sent = node.sent
    node.traffic(rounds=2 * sent // len(MODELS))
    after = node.measure()
    assert node.sent >= 3 * sent
    grown = {}
    for key in ("exporter", "recorded", "engines"):
        new = after[key] - before[key]
        if new:
            old_values, new_values = _values_by_label(before[key]), _values_by_label(after[key])
            grown[key] = {
                "new series": len(new),
                "labels with new values": {
                    label: sorted(values - old_values.get(label, set()))[:5]
                    for label, values in new_values.items()
                    if values - old_values.get(label, set())
                },
                "examples": sorted(new)[:3],
            }
    assert not grown, f"series grew with {node.sent - sent} more requests: {grown}"
