"""The scrape: every collector run in turn, timed, and isolated, so that one that fails leaves
out only its own metrics and reports ``vigil_exporter_collector_success{collector} 0``
(node_exporter's pattern; an HTTP 500 would hide every other source just when it matters)."""

from __future__ import annotations

import platform
import time
from collections.abc import Iterator, Sequence
from typing import Protocol

from loguru import logger
from prometheus_client import CollectorRegistry
from prometheus_client.process_collector import ProcessCollector as OwnProcessCollector

from . import __version__
from .catalog import family


class Collector(Protocol):
    def collect(self) -> Iterator: ...


class GuardedCollectors:
    def __init__(self, collectors: Sequence[tuple[str, Collector]]):
        self.collectors = collectors
        self._failing: set[str] = set()

    def describe(self) -> list:
        return []  # families vary per scrape; nothing to check at registration

    def collect(self) -> Iterator:
        success, duration = (
            family("vigil_exporter_collector_success"),
            family("vigil_exporter_collector_duration_seconds"),
        )
        for name, collector in self.collectors:
            started = time.perf_counter()
            try:
                families = list(collector.collect())
                ok = True
            except Exception:  # noqa: BLE001 - isolate the failure; the rest is served
                families, ok = [], False
                if name not in self._failing:
                    logger.exception("collector {} failed; its metrics are left out", name)
            if ok and name in self._failing:
                logger.info("collector {} works again", name)
            (self._failing.discard if ok else self._failing.add)(name)
            success.add_metric([name], 1.0 if ok else 0.0)
            duration.add_metric([name], time.perf_counter() - started)
            yield from families
        info = family("vigil_exporter_build_info")
        info.add_metric([], {"version": __version__, "python_version": platform.python_version()})
        yield info
        yield success
        yield duration


def build_registry(collectors: Sequence[tuple[str, Collector]]) -> CollectorRegistry:
    # Without names, so that /metrics?name[]=... filters its families too (prometheus_client
    # looks them up by the names a collector describes).
    registry = CollectorRegistry(auto_describe=False, support_collectors_without_names=True)
    registry.register(GuardedCollectors(collectors))
    OwnProcessCollector(registry=registry)  # the exporter's own process_* (CPU, memory)
    return registry
