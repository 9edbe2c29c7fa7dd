"""The black-box probe's latest results per target and check."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from ..catalog import family
from ..probe import TargetProber


class ProbeCollector:
    def __init__(self, probers: Sequence[TargetProber]):
        self.probers = probers

    def collect(self) -> Iterator:
        names = (
            "vigil_probe_success",
            "vigil_probe_http_status",
            "vigil_probe_duration_seconds",
            "vigil_probe_last_run_timestamp_seconds",
            "vigil_probe_checks",
            "vigil_probe_canary_time_to_first_token_seconds",
            "vigil_probe_canary_empty",
            "vigil_target_info",
        )
        fams = {name: family(name) for name in names}
        for prober in self.probers:
            state = prober.state()
            if state.engine is not None:
                fams["vigil_target_info"].add_metric(
                    [state.label, state.engine, state.engine_source], 1.0
                )
            for check, result in sorted(state.results.items()):
                labels = [state.label, check]
                fams["vigil_probe_success"].add_metric(labels, 1.0 if result.success else 0.0)
                fams["vigil_probe_http_status"].add_metric(labels, result.status)
                fams["vigil_probe_duration_seconds"].add_metric(labels, result.duration_s)
                fams["vigil_probe_last_run_timestamp_seconds"].add_metric(
                    labels, result.finished_at
                )
            canary = state.results.get("canary")
            if canary is not None and canary.success:
                if canary.ttft_s is not None:
                    fams["vigil_probe_canary_time_to_first_token_seconds"].add_metric(
                        [state.label], canary.ttft_s
                    )
                fams["vigil_probe_canary_empty"].add_metric(
                    [state.label], 1.0 if canary.empty else 0.0
                )
            for (check, result), count in sorted(state.counts.items()):
                fams["vigil_probe_checks"].add_metric([state.label, check, result], count)
        yield from fams.values()
