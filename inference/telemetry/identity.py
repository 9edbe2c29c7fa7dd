"""The process identity file in the state directory, for the companion exporter.

``<state-dir>/processes/<pid>.json`` says which process writes the metrics files with that pid,
what it serves and where, and when it started, so that the exporter can watch the process from
outside (alive, /proc state, CPU) and tell a dead process's files from a live one's. The file is
replaced atomically and removed at a clean exit.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any


def _proc_start_ticks(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat: start time in clock ticks since boot (Linux only)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[19])


def identity_path(state_dir: str | os.PathLike, pid: int | None = None) -> Path:
    return Path(state_dir) / "processes" / f"{pid or os.getpid()}.json"


def write_identity(state_dir: str | os.PathLike, **fields: Any) -> Path:
    pid = os.getpid()
    path = identity_path(state_dir, pid)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"pid": pid, "proc_start_ticks": _proc_start_ticks(pid),
              "hostname": socket.gethostname(), "updated_at": time.time(), **fields}
    staging = path.with_suffix(".json.tmp")
    staging.write_text(json.dumps(record, indent=2, sort_keys=True))
    staging.replace(path)
    return path


def remove_identity(state_dir: str | os.PathLike) -> None:
    identity_path(state_dir).unlink(missing_ok=True)
