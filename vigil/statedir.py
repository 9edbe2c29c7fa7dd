"""The state directory: the contract between the inference process (writer) and the exporter
(reader), in one place.

    <state-dir>/metrics/            prometheus_client multiprocess files, one set per pid
    <state-dir>/processes/<pid>.json  the identity of each live inference process

The identity says which process writes the metrics files with that pid (as the process sees
its own pid: inside a container that is its namespace's pid), what it serves and since when
(its start time in clock ticks, so that a reused pid is told from the old one). It is replaced
atomically and removed at a clean exit: an identity whose process is gone means an unclean
exit. Gauges are written in ``liveall`` mode, one file per pid, so that the reader can drop a
dead process's gauges and keep its counters.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import procfs

METRICS_DIR = "metrics"
PROCESSES_DIR = "processes"
# The engine's progress heartbeat, the one gauge the exporter reads itself (for its age).
HEARTBEAT_METRIC = "inference_progress_heartbeat_timestamp_seconds"
# prometheus_client's multiprocess file names (``<type>[_<mode>]_<pid>.db``): the gauges of
# ``liveall`` mode, which the exporter removes for a dead process.
LIVE_GAUGE_GLOB = "gauge_live*_*.db"
_PID_IN_FILE_NAME = re.compile(r"_(\d+)\.db$")


def metrics_dir(state_dir: str | os.PathLike) -> Path:
    return Path(state_dir) / METRICS_DIR


def live_gauge_file(state_dir: str | os.PathLike, pid: int) -> Path:
    """The file holding a process's ``liveall`` gauges (its heartbeat among them)."""
    return metrics_dir(state_dir) / f"gauge_liveall_{pid}.db"


def gauge_files_of(state_dir: str | os.PathLike, pid: int) -> list[Path]:
    """Every gauge file a process with this pid wrote."""
    return list(metrics_dir(state_dir).glob(f"gauge_*_{pid}.db"))


def pid_of_file(path: Path) -> int | None:
    match = _PID_IN_FILE_NAME.search(path.name)
    return int(match.group(1)) if match else None


# ---- the identity file -----------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    pid: int  # as the process sees itself
    start_ticks: int | None  # None where /proc could not tell (not Linux)
    model: str
    path: Path
    fields: dict[str, Any]  # the whole record: role, version, address, ...


def identity_path(state_dir: str | os.PathLike, pid: int | None = None) -> Path:
    return Path(state_dir) / PROCESSES_DIR / f"{pid or os.getpid()}.json"


def write_identity(state_dir: str | os.PathLike, model: str, **fields: Any) -> Path:
    """Write (or replace, atomically) this process's identity."""
    pid = os.getpid()
    path = identity_path(state_dir, pid)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "pid": pid,
        "proc_start_ticks": procfs.start_ticks(pid),
        "model": model,
        "hostname": socket.gethostname(),
        "updated_at": time.time(),
        **fields,
    }
    staging = path.with_suffix(".json.tmp")
    staging.write_text(json.dumps(record, indent=2, sort_keys=True))
    staging.replace(path)
    return path


def remove_identity(state_dir: str | os.PathLike) -> None:
    """At a clean exit: the reader then knows the process did not die."""
    identity_path(state_dir).unlink(missing_ok=True)


def parse_identity(path: Path, text: str) -> Identity:
    """Raises ValueError, KeyError or TypeError for a record that is not an identity."""
    record = json.loads(text)
    return Identity(
        pid=int(record["pid"]),
        start_ticks=record.get("proc_start_ticks"),
        model=str(record.get("model") or ""),
        path=path,
        fields=record,
    )


def read_identities(state_dir: str | os.PathLike) -> list[Identity]:
    found = []
    for path in sorted((Path(state_dir) / PROCESSES_DIR).glob("*.json")):
        try:
            found.append(parse_identity(path, path.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being replaced, or not ours: read again next time
    return found
