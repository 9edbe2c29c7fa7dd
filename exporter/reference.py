"""Generate the metrics reference (docs/metrics.md): the inference process's metrics, which the
exporter passes on, and the exporter's own.

    python -m exporter.reference > docs/metrics.md
"""

from __future__ import annotations

from inference.telemetry import reference as inference_reference

from .catalog import EXPORTER_METRICS

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


def render() -> str:
    rows = []
    for spec in EXPORTER_METRICS:
        labels = ", ".join(f"`{label}`" for label in spec.labels) or "-"
        rows.append(f"| `{spec.exposed_name}` | {spec.kind} | {spec.unit or '-'} | {labels} | "
                    f"{spec.help} |")
    return inference_reference.render() + EXPORTER_HEADER + "\n".join(rows) + "\n"


def all_metric_names() -> set[str]:
    """Every series name either process publishes (histogram suffixes included)."""
    from inference.telemetry.catalog import METRICS

    names = set()
    for spec in METRICS + EXPORTER_METRICS:
        names.add(spec.exposed_name)
        if spec.kind == "histogram":
            names.update(spec.name + suffix for suffix in ("_bucket", "_sum", "_count"))
    return names


if __name__ == "__main__":
    print(render(), end="")
