"""Processes seen through /proc: the one reader of ``/proc/<pid>/stat`` in the project.

The inference process records its own start time (field 22) in its identity file; the exporter
reads the same fields to tell whether that process is alive, what state it is in and how much
CPU it uses; the benchmarks read CPU time from here too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
STATES = {
    "R": "running",
    "S": "sleeping",
    "D": "disk_sleep",
    "T": "stopped",
    "t": "tracing_stop",
    "Z": "zombie",
    "X": "dead",
    "I": "idle",
}
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass(frozen=True)
class ProcStat:
    pid: int  # in the reader's pid namespace
    state: str  # a value of STATES
    cpu_seconds: float  # user plus system
    threads: int
    start_ticks: int  # clock ticks after boot
    resident_bytes: int
    # Defaults so that figures made by hand (tests) need not name them.
    ppid: int = 0  # the parent's pid in the reader's pid namespace; 0: none or outside it
    comm: str = ""  # the command name (short, truncated by the kernel), not the command line


class ProcUnreadable(Exception):
    """/proc could not be read for a reason other than the process being gone (out of file
    descriptors, a permission): the process's state is unknown, not dead."""


def parse_stat(raw: bytes, pid: int) -> ProcStat | None:
    """The fields of one ``/proc/<pid>/stat`` line; None for a process being torn down."""
    # The command name (field 2) may hold spaces, parentheses and any bytes: split after the
    # last ')'.
    close = raw.rindex(b")")
    rest = raw[close + 2 :].decode("ascii", "replace").split()
    if len(rest) < 22:
        return None
    open_ = raw.find(b"(")
    return ProcStat(
        pid=pid,
        state=STATES.get(rest[0], "unknown"),
        cpu_seconds=(int(rest[11]) + int(rest[12])) / CLOCK_TICKS,
        threads=int(rest[17]),
        start_ticks=int(rest[19]),
        resident_bytes=int(rest[21]) * PAGE_SIZE,
        ppid=int(rest[1]),
        comm=raw[open_ + 1 : close].decode("utf-8", "replace") if 0 <= open_ < close else "",
    )


def read_stat(pid: int, proc: Path = PROC) -> ProcStat | None:
    """The process's figures; None when it does not exist; ProcUnreadable when unknown."""
    try:
        raw = (proc / str(pid) / "stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError as exc:
        raise ProcUnreadable(f"/proc/{pid}/stat: {exc}") from None
    return parse_stat(raw, pid)


def start_ticks(pid: int, proc: Path = PROC) -> int | None:
    """When the process started, in clock ticks after boot; None where /proc cannot tell."""
    try:
        stat = read_stat(pid, proc)
    except ProcUnreadable:
        return None
    return stat.start_ticks if stat is not None else None


def boot_time(proc: Path = PROC) -> float:
    for line in (proc / "stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    return 0.0


def innermost_pid(pid: int, proc: Path = PROC) -> int | None:
    """The process's pid in its own (innermost) pid namespace, from the NSpid line."""
    try:
        for line in (proc / str(pid) / "status").read_bytes().splitlines():
            if line.startswith(b"NSpid:"):
                return int(line.split()[-1])
    except (OSError, ValueError):
        return None
    return None
