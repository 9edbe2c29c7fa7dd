"""The inference processes' own metrics, from the prometheus_client multiprocess files in the
state directory, aggregated as prometheus_client's multiprocess mode does (counters and
histograms summed over processes, dead ones included; gauges per live process, with ``pid``)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.multiprocess import MultiProcessCollector

from ..inference_dir import InferenceDirectory


class InferenceCollector:
    def __init__(self, directory: InferenceDirectory):
        self.directory = directory
        self.directory.metrics_dir.mkdir(parents=True, exist_ok=True)
        self._collector = MultiProcessCollector(None, path=str(self.directory.metrics_dir))

    def collect(self) -> Iterator:
        yield from self._collector.collect()
