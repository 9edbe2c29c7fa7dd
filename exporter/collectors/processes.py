"""The inference processes seen from outside: alive, /proc state, CPU, memory, threads, start
time, and the age of the last progress heartbeat, computed now."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from vigil.procfs import CLOCK_TICKS, STATES, boot_time

from ..catalog import family
from ..inference_dir import InferenceDirectory


class ProcessCollector:
    def __init__(self, directory: InferenceDirectory, clock: Callable[[], float] = time.time):
        self.directory = directory
        self.clock = clock
        self._boot = boot_time()

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
        )
        fams = {name: family(name) for name in names}
        now = self.clock()
        for view in self.directory.views():
            labels = [view.identity.model, str(view.identity.pid)]
            fams["vigil_process_alive"].add_metric(labels, 0.0 if view.stat is None else 1.0)
            if view.stat is None:
                continue
            stat = view.stat
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
            beat = self.directory.heartbeat(view.identity.pid)
            if beat:
                fams["vigil_process_heartbeat_age_seconds"].add_metric(labels, max(0.0, now - beat))
        for model, count in sorted(self.directory.unclean_exits().items()):
            fams["vigil_process_unclean_exits"].add_metric([model], count)
        yield from fams.values()
