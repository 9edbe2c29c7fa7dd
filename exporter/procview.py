"""The inference processes of a state directory, seen from outside through /proc.

Each inference process writes ``<state-dir>/processes/<pid>.json`` with its pid and start time
(clock ticks since boot). The pid is the one the process sees: inside a container that is its
namespace's pid, not the host's. A process is found here by pid and start time in our own pid
namespace, or else by scanning /proc for a process whose innermost namespace pid (``NSpid``)
and start time match: an exporter in the host's pid namespace (compose: ``pid: host``) so sees
containerised inference processes and can tie them to NVML's host pids.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATES = {"R": "running", "S": "sleeping", "D": "disk_sleep", "T": "stopped",
          "t": "tracing_stop", "Z": "zombie", "X": "dead", "I": "idle"}
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass(frozen=True)
class ProcStat:
    pid: int  # in our namespace
    state: str  # a value of STATES
    cpu_seconds: float
    threads: int
    start_ticks: int
    resident_bytes: int


@dataclass(frozen=True)
class Identity:
    pid: int  # as the process sees itself
    start_ticks: int | None
    model: str
    path: Path
    fields: dict[str, Any]


class ProcUnreadable(Exception):
    """/proc could not be read for a reason other than the process being gone (out of file
    descriptors, a permission): the process's state is unknown, not dead."""


def read_stat(pid: int, proc: Path = Path("/proc")) -> ProcStat | None:
    """The process's figures; None when it does not exist; ProcUnreadable when unknown."""
    try:
        raw = (proc / str(pid) / "stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError as exc:
        raise ProcUnreadable(f"/proc/{pid}/stat: {exc}") from None
    # The command name (field 2) may hold spaces, parentheses and any bytes: split after the
    # last ')'.
    rest = raw[raw.rindex(b")") + 2:].decode("ascii", "replace").split()
    if not rest:
        return None  # a process being torn down

    return ProcStat(pid=pid, state=STATES.get(rest[0], "unknown"),
                    cpu_seconds=(int(rest[11]) + int(rest[12])) / CLOCK_TICKS,
                    threads=int(rest[17]), start_ticks=int(rest[19]),
                    resident_bytes=int(rest[21]) * PAGE_SIZE)


def boot_time(proc: Path = Path("/proc")) -> float:
    for line in (proc / "stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    return 0.0


def innermost_pid(pid: int, proc: Path = Path("/proc")) -> int | None:
    """The process's pid in its own (innermost) pid namespace, from the NSpid line."""
    try:
        for line in (proc / str(pid) / "status").read_bytes().splitlines():
            if line.startswith(b"NSpid:"):
                return int(line.split()[-1])
    except (OSError, ValueError):
        return None
    return None


def read_identities(state_dir: Path) -> list[Identity]:
    found = []
    for path in sorted((state_dir / "processes").glob("*.json")):
        try:
            record = json.loads(path.read_text())
            found.append(Identity(pid=int(record["pid"]),
                                  start_ticks=record.get("proc_start_ticks"),
                                  model=str(record.get("model") or ""), path=path, fields=record))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being replaced, or not ours: read again next time
    return found


class ProcessLocator:
    """Finds the process of an identity; remembers where it found it (a /proc scan is dear)."""

    def __init__(self, proc: Path = Path("/proc")):
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
            if (stat is not None and stat.start_ticks == identity.start_ticks
                    and innermost_pid(stat.pid, self.proc) == identity.pid):
                return stat
        return None
