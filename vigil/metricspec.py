"""The one type both metric catalogs use (the inference process's and the exporter's): a
metric's name, type, unit, labels and meaning, from which metrics, their help text and the
metrics reference are made."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MetricSpec:
    name: str  # as exposed, without the _total/_bucket suffixes prometheus_client adds
    kind: str  # counter, gauge, histogram, info
    unit: str
    labels: tuple[str, ...]
    help: str
    buckets: tuple[float, ...] = ()

    @property
    def exposed_name(self) -> str:
        return self.name + "_total" if self.kind == "counter" else self.name

    @property
    def series_names(self) -> tuple[str, ...]:
        """Every series name Prometheus sees for it (a histogram's three)."""
        if self.kind == "histogram":
            return tuple(self.name + suffix for suffix in ("_bucket", "_sum", "_count"))
        return (self.exposed_name,)
