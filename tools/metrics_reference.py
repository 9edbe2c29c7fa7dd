"""The metrics reference (docs/metrics.md), generated from both catalogs: the inference
process's metrics, which the exporter passes on from the state directory, and the exporter's own.

    python -m tools.metrics_reference > docs/metrics.md
"""

from __future__ import annotations

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


def render() -> str:
    return (
        HEADER
        + "\n".join(_inference_rows())
        + "\n"
        + EXPORTER_HEADER
        + "\n".join(_exporter_rows())
        + "\n"
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
