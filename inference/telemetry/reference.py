"""Generate the metrics reference (docs/metrics.md) from the catalog.

    python -m exporter.reference > docs/metrics.md  (this section and the exporter's)
"""

from __future__ import annotations

from .catalog import METRICS

HEADER = """# Metrics reference

Generated from `inference/telemetry/catalog.py` and `exporter/catalog.py` by
`python -m exporter.reference`;
a test fails when this file and the code disagree. Do not edit by hand.

The inference process records these through prometheus_client's multiprocess mode into
`<state-dir>/metrics`; it serves them on its own `/metrics`, and the companion exporter publishes
them from the same files. Gauges are per process: multiprocess collection adds a `pid` label.
Histograms also expose `_bucket`, `_sum` and `_count` series.

## Inference process metrics

| Metric | Type | Unit | Labels | Meaning |
| --- | --- | --- | --- | --- |
"""


def render() -> str:
    rows = []
    for spec in METRICS:
        labels = ", ".join(f"`{label}`" for label in spec.labels)
        if spec.kind == "gauge":
            labels = (labels + ", " if labels else "") + "`pid`"
        meaning = spec.help
        if spec.buckets:
            meaning += " Buckets: " + ", ".join(f"{b:g}" for b in spec.buckets) + "."
        rows.append(f"| `{spec.exposed_name}` | {spec.kind} | {spec.unit or '-'} | {labels} | "
                    f"{meaning} |")
    return HEADER + "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(render(), end="")
