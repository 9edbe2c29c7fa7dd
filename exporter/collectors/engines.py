"""The engines' own state as the exporter reads it from their /metrics (requests running and
waiting, the progress it keeps, whether /metrics could be read), and the hang reports written."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from ..catalog import family
from ..hang_dumps import HangDumper
from ..probe import TargetProber


class EngineStateCollector:
    def __init__(self, probers: Sequence[TargetProber], dumper: HangDumper | None = None):
        self.probers = probers
        self.dumper = dumper

    def collect(self) -> Iterator:
        names = (
            "vigil_engine_metrics_up",
            "vigil_engine_requests_running",
            "vigil_engine_requests_waiting",
            "vigil_engine_progress",
            "vigil_engine_last_progress_timestamp_seconds",
            "vigil_engine_hang_dumps",
        )
        fams = {name: family(name) for name in names}
        for prober in self.probers:
            state = prober.state()
            snapshot = state.engine_state
            if snapshot is None:
                continue
            fams["vigil_engine_metrics_up"].add_metric(
                [state.label, snapshot.engine], 1.0 if snapshot.up else 0.0
            )
            for model in snapshot.models:
                # An engine without a model label (TGI): the model the target lists, else the
                # target, as its processes are labelled.
                labels = [state.label, snapshot.engine, model.model or state.model or state.label]
                if model.running is not None:
                    fams["vigil_engine_requests_running"].add_metric(labels, model.running)
                if model.waiting is not None:
                    fams["vigil_engine_requests_waiting"].add_metric(labels, model.waiting)
                fams["vigil_engine_progress"].add_metric(labels, model.progress_total)
                fams["vigil_engine_last_progress_timestamp_seconds"].add_metric(
                    labels, model.last_progress_at
                )
        if self.dumper is not None:
            for (target, engine, result), count in sorted(self.dumper.counts().items()):
                fams["vigil_engine_hang_dumps"].add_metric([target, engine, result], count)
        yield from fams.values()
