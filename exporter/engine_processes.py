"""The processes of the engines the exporter probes, found from their ports (vigil/netproc.py):
a vLLM server's API process, its EngineCore and its workers, seen through /proc like our own
inference processes.

A watcher thread refreshes the view off the scrape path: the processes behind each local
target's port are looked up again every ``discover_interval`` seconds (a scan of every process's
file descriptors) or as soon as the listener is gone, and in between only their
``/proc/<pid>/stat`` is read. A listener that is replaced (another pid, or the same pid started
anew) counts as a restart. Targets on other hosts have no processes here.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from loguru import logger

from vigil.netproc import PROC, EngineProcesses, find_engine_processes
from vigil.procfs import ProcStat, ProcUnreadable, read_stat

from .background import start_repeating
from .probe import TargetProber


@dataclass(frozen=True)
class EngineView:
    target: str  # the probe's target label
    engine: str  # vigil, vllm, sglang, tgi, or "" while not known
    model: str  # the model it serves (GET /v1/models), "" while not known
    processes: tuple[ProcStat, ...]  # the listener first, then its descendants
    listener: int | None
    restarts: int
    problem: str | None = None


@dataclass
class _Tracked:
    found: EngineProcesses | None = None
    listener_start: tuple[int, int] | None = None  # (pid, start ticks) of the listener
    stats: dict[int, ProcStat] = field(default_factory=dict)
    restarts: int = 0
    discovered_at: float = float("-inf")
    last_problem: str | None = None  # the problem last logged, so that it is logged once


def is_local(host: str) -> bool:
    """Whether ``host`` names this machine (loopback, or an address of one of its interfaces):
    binding a socket to an address succeeds only where the address is the machine's own."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    for family, kind, proto, _name, address in infos:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.bind((address[0], 0))
            return True
        except OSError:
            continue
    return False


class EngineProcessWatcher:
    def __init__(
        self,
        probers: Sequence[TargetProber],
        interval: float = 1.0,
        discover_interval: float = 15.0,
        proc: Path = PROC,
        netns_pid: int | None = None,
        local: Callable[[str], bool] = is_local,
    ):
        self.probers = [p for p in probers if local(urlsplit(p.url).hostname or "")]
        self.interval, self.discover_interval = interval, discover_interval
        self.proc, self.netns_pid = proc, netns_pid
        self._tracked = {p.label: _Tracked() for p in self.probers}
        self._views: tuple[EngineView, ...] = ()
        self._stop = threading.Event()

    def start(self) -> None:
        if not self.probers:
            return
        self.refresh()
        start_repeating(
            "engine-processes",
            self.interval,
            self.refresh,
            self._stop,
            "refreshing the engines' processes",
        )

    def stop(self) -> None:
        self._stop.set()

    def views(self) -> tuple[EngineView, ...]:
        return self._views  # replaced whole by refresh(): no lock on the scrape

    def refresh(self) -> tuple[EngineView, ...]:
        views = []
        for prober in self.probers:
            tracked = self._tracked[prober.label]
            self._update(prober, tracked)
            state = prober.state()
            found = tracked.found
            views.append(
                EngineView(
                    target=prober.label,
                    engine=state.engine or "",
                    model=state.model or "",
                    processes=tuple(tracked.stats.values()),
                    listener=found.pid if found is not None else None,
                    restarts=tracked.restarts,
                    problem=found.problem if found is not None else None,
                )
            )
        self._views = tuple(views)
        return self._views

    def _update(self, prober: TargetProber, tracked: _Tracked) -> None:
        now = time.monotonic()
        listener = tracked.found.pid if tracked.found is not None else None
        stats = self._read(tracked.stats) if listener is not None else {}
        gone = listener is None or listener not in stats
        # A listener that went away is looked for again at once; when none was found, only
        # after the discovery interval (a scan of every process's descriptors is dear).
        due = now - tracked.discovered_at >= self.discover_interval
        if not due and (not gone or listener is None):
            tracked.stats = stats
            return
        port = urlsplit(prober.url).port or (443 if prober.url.startswith("https") else 80)
        found = find_engine_processes(port, self.proc, netns_pid=self.netns_pid)
        tracked.found, tracked.discovered_at = found, now
        tracked.stats = {stat.pid: stat for stat in found.processes}
        if found.pid is None or found.pid not in tracked.stats:
            if found.problem and found.problem != tracked.last_problem:  # each problem once
                logger.warning("no processes for target {}: {}", prober.label, found.problem)
            tracked.last_problem = found.problem
            return
        tracked.last_problem = None
        start = (found.pid, tracked.stats[found.pid].start_ticks)
        if tracked.listener_start is not None and start != tracked.listener_start:
            tracked.restarts += 1
            logger.warning(
                "the engine behind {} was restarted: listener pid {} now", prober.label, start[0]
            )
        elif tracked.listener_start is None:
            logger.info(
                "target {} is served by pid {} with {} more process(es)",
                prober.label,
                found.pid,
                len(found.processes) - 1,
            )
        tracked.listener_start = start

    def _read(self, known: dict[int, ProcStat]) -> dict[int, ProcStat]:
        """The known processes read again; those gone (or replaced: another start time) left out."""
        fresh = {}
        for pid, before in known.items():
            try:
                stat = read_stat(pid, self.proc)
            except ProcUnreadable:
                stat = before  # unknown now: keep what we knew
            if stat is not None and stat.start_ticks == before.start_ticks:
                fresh[pid] = stat
        return fresh
