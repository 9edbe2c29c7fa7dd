"""The inference processes seen from outside: alive, /proc state, CPU, memory, threads, start
time, and the age of the last progress heartbeat, computed now. The processes of the engines the
exporter probes (found from their ports) are published in the same series, with the target's
model and their host pid, and described by vigil_engine_process_info."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from vigil.procfs import CLOCK_TICKS, STATES, ProcStat, boot_time

from ..catalog import family
from ..engine_processes import EngineProcessWatcher
from ..inference_dir import InferenceDirectory


class ProcessCollector:
    def __init__(
        self,
        directory: InferenceDirectory,
        engines: EngineProcessWatcher | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.directory = directory
        self.engines = engines
        self.clock = clock
        self._boot = boot_time()

    def _stat_metrics(self, fams: dict, labels: list[str], stat: ProcStat) -> None:
        fams["vigil_process_alive"].add_metric(labels, 1.0)
        for state in sorted(set(STATES.values())):
            fams["vigil_process_state"].add_metric(
                labels + [state], 1.0 if stat.state == state else 0.0
            )
        fams["vigil_process_cpu_seconds"].add_metric(labels, stat.cpu_seconds)
        fams["vigil_process_resident_memory_bytes"].add_metric(labels, stat.resident_bytes)
        fams["vigil_process_threads"].add_metric(labels, stat.threads)
        fams["vigil_process_start_time_seconds"].add_metric(
            labels, self._boot + stat.start_ticks / CLOCK_TICKS
        )

    def _engine_metrics(self, fams: dict, own_pids: set[int]) -> None:
        for view in self.engines.views() if self.engines is not None else ():
            fams["vigil_engine_processes"].add_metric(
                [view.target, view.engine], len(view.processes)
            )
            fams["vigil_engine_restarts"].add_metric([view.target, view.engine], view.restarts)
            model = view.model or view.target  # a model is needed to tie VRAM and alerts to it
            for stat in view.processes:
                role = "listener" if stat.pid == view.listener else "child"
                fams["vigil_engine_process_info"].add_metric(
                    [view.target, view.engine, model, str(stat.pid), role, stat.comm], 1.0
                )
                if stat.pid not in own_pids:  # ours are published from the state directory
                    self._stat_metrics(fams, [model, str(stat.pid)], stat)

    def collect(self) -> Iterator:
        names = (
            "vigil_process_alive",
            "vigil_process_state",
            "vigil_process_cpu_seconds",
            "vigil_process_resident_memory_bytes",
            "vigil_process_threads",
            "vigil_process_start_time_seconds",
            "vigil_process_heartbeat_age_seconds",
            "vigil_process_unclean_exits",
            "vigil_engine_processes",
            "vigil_engine_process_info",
            "vigil_engine_restarts",
        )
        fams = {name: family(name) for name in names}
        now = self.clock()
        for view in self.directory.views():
            labels = [view.identity.model, str(view.identity.pid)]
            if view.stat is None:
                fams["vigil_process_alive"].add_metric(labels, 0.0)
                continue
            self._stat_metrics(fams, labels, view.stat)
            beat = self.directory.heartbeat(view.identity.pid)
            if beat:
                fams["vigil_process_heartbeat_age_seconds"].add_metric(labels, max(0.0, now - beat))
        own = {v.stat.pid for v in self.directory.views() if v.stat is not None}
        self._engine_metrics(fams, own)
        for model, count in sorted(self.directory.unclean_exits().items()):
            fams["vigil_process_unclean_exits"].add_metric([model], count)
        yield from fams.values()
