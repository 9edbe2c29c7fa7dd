"""The Prometheus text format (0.0.4), written fast.

``prometheus_client.generate_latest`` gives the same bytes (a test checks it) but validates
every label name of every sample against the UTF-8 escaping rules, which was 60 % of a scrape's
CPU with four inference processes' histograms (bench/exporter_scrape.py). Here each series'
text (name and escaped labels) is built once and remembered, since the same series recur every
scrape; only the values are formatted anew.
"""

from __future__ import annotations

from typing import Iterable

from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.utils import floatToGoString

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_OM_SUFFIXES = ("_created", "_gsum", "_gcount")
_TYPES = {"info": "gauge", "stateset": "gauge", "gaugehistogram": "histogram",
          "unknown": "untyped"}
_metric_names: dict[str, str] = {}
_label_names: dict[str, str] = {}
_series_cache: dict[tuple, str] = {}
MAX_CACHED_SERIES = 100_000


def _metric_name(name: str) -> str:
    escaped = _metric_names.get(name)
    if escaped is None:
        escaped = _metric_names[name] = openmetrics.escape_metric_name(name)
    return escaped


def _label_name(name: str) -> str:
    escaped = _label_names.get(name)
    if escaped is None:
        escaped = _label_names[name] = openmetrics.escape_label_name(name)
    return escaped


def _label_value(value: str) -> str:
    if "\\" in value or "\n" in value or '"' in value:
        return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return value


def _series(name: str, labels: dict[str, str]) -> str:
    """``name{label="value",...}`` of a series, remembered: the same series recurs every scrape."""
    key = (name, tuple(labels.items()))
    text = _series_cache.get(key)
    if text is None:
        if len(_series_cache) >= MAX_CACHED_SERIES:
            _series_cache.clear()  # series churn (restarts, new pids): start over
        inner = ",".join(f'{_label_name(k)}="{_label_value(v)}"' for k, v in sorted(labels.items()))
        text = _series_cache[key] = _metric_name(name) + ("{" + inner + "}" if inner else "")
    return text


def _sample_line(sample) -> str:
    timestamp = ""
    if sample.timestamp is not None:
        timestamp = f" {int(float(sample.timestamp) * 1000):d}"
    return f"{_series(sample.name, sample.labels)} {floatToGoString(sample.value)}{timestamp}\n"


def render(collector) -> bytes:
    """The exposition of everything ``collector.collect()`` yields (a registry, say)."""
    output: list[str] = []
    for metric in collector.collect():
        name, kind = metric.name, metric.type
        if kind == "counter":
            name += "_total"
        elif kind == "info":
            name += "_info"
        kind = _TYPES.get(kind, kind)
        documentation = metric.documentation.replace("\\", r"\\").replace("\n", r"\n")
        exposed = _metric_name(name)
        output.append(f"# HELP {exposed} {documentation}\n# TYPE {exposed} {kind}\n")
        extra: dict[str, list[str]] = {}
        for sample in metric.samples:
            for suffix in _OM_SUFFIXES:
                if sample.name == metric.name + suffix:
                    extra.setdefault(suffix, []).append(_sample_line(sample))
                    break
            else:
                output.append(_sample_line(sample))
        for suffix, lines in sorted(extra.items()):
            exposed = _metric_name(metric.name + suffix)
            output.append(f"# HELP {exposed} {documentation}\n# TYPE {exposed} gauge\n")
            output.extend(lines)
    return "".join(output).encode("utf-8")


def render_all(collectors: Iterable) -> bytes:
    return b"".join(render(c) for c in collectors)
