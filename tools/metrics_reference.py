"""The metrics reference (docs/metrics.md), generated from both catalogs: the inference
process's metrics, which the exporter passes on from the state directory, and the exporter's own.

    python -m tools.metrics_reference > docs/metrics.md
"""

from __future__ import annotations

from alerts.engines import PROFILES, Profile
from exporter.catalog import EXPORTER_METRICS
from inference.telemetry.catalog import METRICS

HEADER = """# Metrics reference

Generated from `inference/telemetry/catalog.py` and `exporter/catalog.py` by
`scripts/generate`;
a test fails when this file and the code disagree. Do not edit by hand.

The inference process records these through prometheus_client's multiprocess mode into
`<state-dir>/metrics`; it serves them on its own `/metrics`, and the companion exporter publishes
them from the same files. Gauges are per process: multiprocess collection adds a `pid` label.
Histograms also expose `_bucket`, `_sum` and `_count` series.

## Inference process metrics

| Metric | Type | Unit | Labels | Meaning |
| --- | --- | --- | --- | --- |
"""

EXPORTER_HEADER = """
## Exporter metrics

Published by the companion exporter (`python -m exporter`) from NVML, /proc, its probe and
itself. GPU series carry `gpu` (NVML index), `uuid` and `gpu_name`; a field the GPU does not
support is absent, never zero. Process series carry the inference process's `model` and `pid`
(its own pid, as in the inference metrics above). The exporter also publishes its own
`process_*` metrics (prometheus_client's process collector).

| Metric | Type | Unit | Labels | Meaning |
| --- | --- | --- | --- | --- |
"""


def _inference_rows() -> list[str]:
    rows = []
    for spec in METRICS:
        labels = ", ".join(f"`{label}`" for label in spec.labels)
        if spec.kind == "gauge":
            labels = (labels + ", " if labels else "") + "`pid`"
        meaning = spec.help
        if spec.buckets:
            meaning += " Buckets: " + ", ".join(f"{b:g}" for b in spec.buckets) + "."
        rows.append(
            f"| `{spec.exposed_name}` | {spec.kind} | {spec.unit or '-'} | {labels} | {meaning} |"
        )
    return rows


def _exporter_rows() -> list[str]:
    rows = []
    for spec in EXPORTER_METRICS:
        labels = ", ".join(f"`{label}`" for label in spec.labels) or "-"
        rows.append(
            f"| `{spec.exposed_name}` | {spec.kind} | {spec.unit or '-'} | {labels} | {spec.help} |"
        )
    return rows


ENGINES_HEADER = """
## Engine profiles: every engine in one vocabulary

Recording rules (`alerts/engines.rules.yml`, from `alerts/engines.py`) map each engine's own
series, scraped from the engine (its API port, `GET /metrics`; ours through the exporter), to
the `vigil:engine_*` series below, each with `engine`, `instance` and `model`. The engine-agnostic
alerts (InferenceEngineNoProgress, InferenceKvCacheFull, the queue, latency and error alerts) and
the dashboards read only these. A series an engine has no metric for is absent for it.

| Series | Meaning |
| --- | --- |
| `vigil:engine_requests_running` | requests in the running batch |
| `vigil:engine_requests_waiting` | requests queued for a slot |
| `vigil:engine_progress:rate1m` | forward-pass work per second (unit per engine); 0: none |
| `vigil:engine_generation_tokens:rate1m` | generated tokens per second |
| `vigil:engine_kv_cache_usage_ratio` | share of the KV-cache pool in use, 0 to 1 |
| `vigil:engine_time_to_first_token_seconds` | `quantile` 0.5 and 0.95 over 5 minutes |
| `vigil:engine_inter_token_latency_seconds` | `quantile` 0.5 and 0.95 over 5 minutes |
| `vigil:engine_request_duration_seconds` | `quantile` 0.5 and 0.95 over 5 minutes |
| `vigil:engine_requests:rate5m` | finished requests per second, failed ones included |
| `vigil:engine_request_errors:rate5m` | requests the engine failed, per second |

Each profile below gives the releases whose metric names it uses, where the names come from, and
the PromQL each series is recorded from (before `sum`/`max by (instance, model)`; the engine's
model label is copied into `model`).
"""

_FIELDS = (
    ("vigil:engine_requests_running", "running"),
    ("vigil:engine_requests_waiting", "waiting"),
    ("vigil:engine_progress:rate1m", "progress"),
    ("vigil:engine_generation_tokens:rate1m", "generation_tokens"),
    ("vigil:engine_kv_cache_usage_ratio", "kv_usage"),
    ("vigil:engine_time_to_first_token_seconds", "ttft_buckets"),
    ("vigil:engine_inter_token_latency_seconds", "itl_buckets"),
    ("vigil:engine_request_duration_seconds", "duration_buckets"),
    ("vigil:engine_requests:rate5m", "requests"),
    ("vigil:engine_request_errors:rate5m", "errors"),
)


def _profile(profile: Profile) -> str:
    lines = [
        f"\n### {profile.engine}\n",
        f"Releases: {profile.releases}. Sources: {profile.sources}. Model label: "
        f"`{profile.model_label or '(none)'}`.\n",
        "| Series | From |",
        "| --- | --- |",
    ]
    for series, field in _FIELDS:
        expr = getattr(profile, field)
        # A | in a table cell ends it, even within backticks: escaped.
        shown = "`" + expr.replace("|", r"\|") + "`" if expr else "absent: no such metric"
        lines.append(f"| `{series}` | {shown} |")
    return "\n".join(lines) + "\n"


def render() -> str:
    return (
        HEADER
        + "\n".join(_inference_rows())
        + "\n"
        + EXPORTER_HEADER
        + "\n".join(_exporter_rows())
        + "\n"
        + ENGINES_HEADER
        + "".join(_profile(profile) for profile in PROFILES)
    )


def all_metric_names() -> set[str]:
    """Every series name either process publishes (histogram suffixes included)."""
    names = set()
    for spec in METRICS + EXPORTER_METRICS:
        names.add(spec.exposed_name)
        names.update(spec.series_names)
    return names


if __name__ == "__main__":
    print(render(), end="")
