"""The inference processes of a state directory, seen from outside through /proc.

Each inference process writes its identity (``vigil.statedir``) with its pid and start time
(clock ticks since boot). The pid is the one the process sees: inside a container that is its
namespace's pid, not the host's. A process is found here by pid and start time in our own pid
namespace, or else by scanning /proc for a process whose innermost namespace pid (``NSpid``)
and start time match: an exporter in the host's pid namespace (compose: ``pid: host``) so sees
containerised inference processes and can tie them to NVML's host pids.
"""

from __future__ import annotations

import os
from pathlib import Path

from vigil.procfs import PROC, ProcStat, ProcUnreadable, innermost_pid, read_stat
from vigil.statedir import Identity

__all__ = ["ProcessLocator", "ProcStat", "ProcUnreadable"]


class ProcessLocator:
    """Finds the process of an identity; remembers where it found it (a /proc scan is dear)."""

    def __init__(self, proc: Path = PROC):
        self.proc = proc
        self._cache: dict[tuple[int, int | None], int] = {}

    def locate(self, identity: Identity) -> ProcStat | None:
        key = (identity.pid, identity.start_ticks)
        cached = self._cache.get(key)
        for pid in ([cached] if cached is not None else []) + [identity.pid]:
            stat = read_stat(pid, self.proc)
            if stat is not None and self._matches(stat, identity, pid == identity.pid):
                self._cache[key] = pid
                return stat
        if identity.start_ticks is None:
            return None
        stat = self._scan(identity)
        if stat is not None:
            self._cache[key] = stat.pid
        else:
            self._cache.pop(key, None)
        return stat

    def _matches(self, stat: ProcStat, identity: Identity, same_pid: bool) -> bool:
        if identity.start_ticks is None:
            return same_pid
        if stat.start_ticks != identity.start_ticks:
            return False
        return same_pid or innermost_pid(stat.pid, self.proc) == identity.pid

    def _scan(self, identity: Identity) -> ProcStat | None:
        try:
            entries = os.listdir(self.proc)
        except OSError:
            return None
        for entry in entries:
            if not entry.isdigit():
                continue
            try:
                stat = read_stat(int(entry), self.proc)
            except ProcUnreadable:
                continue
            if (
                stat is not None
                and stat.start_ticks == identity.start_ticks
                and innermost_pid(stat.pid, self.proc) == identity.pid
            ):
                return stat
        return None
