"""The state directory's inference processes: who is alive, who died, and whose files to drop.

A watcher thread refreshes this view every second (off the scrape path: a /proc scan can take
milliseconds). A process whose identity file remains but which is gone exited uncleanly (crash,
SIGKILL, the watchdog's exit): it is counted once per model, shown as not alive for
``retention`` seconds, and then its identity file is removed. The live-gauge files of dead
processes are removed (``prometheus_client.multiprocess.mark_process_dead``) so that a dead
process's gauges do not look alive; its counters and histograms stay, so totals stay monotonic,
as prometheus_client's multiprocess mode intends.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from loguru import logger
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import mark_process_dead

from .procview import Identity, ProcessLocator, ProcStat, read_identities

HEARTBEAT = "inference_progress_heartbeat_timestamp_seconds"
# Files of a pid with no identity file (the process exited cleanly, or its identity is not
# written yet) are dropped only once they have not changed for this long.
ORPHAN_GRACE_S = 60.0
_HEARTBEAT_KEY = f'["{HEARTBEAT}"'
_PID_IN_NAME = re.compile(r"_(\d+)\.db$")


@dataclass(frozen=True)
class ProcessView:
    identity: Identity
    stat: ProcStat | None  # None: gone
    dead_since: float | None


class InferenceDirectory:
    def __init__(self, state_dir: str | Path, retention: float = 600.0,
                 locator: ProcessLocator | None = None, clock: Callable[[], float] = time.time):
        self.state_dir = Path(state_dir)
        self.metrics_dir = self.state_dir / "metrics"
        self.retention = retention
        self.locator = locator or ProcessLocator()
        self.clock = clock
        self._dead: dict[tuple[int, int | None], float] = {}  # identity key -> when seen gone
        self._unclean: dict[str, int] = {}  # model -> unclean exits witnessed
        self._views: tuple[ProcessView, ...] = ()
        self._refreshed_once = False
        self._lock = threading.Lock()
        self._stop = threading.Event()

    # ---- the watcher thread -----------------------------------------------------------------
    def start(self, interval: float = 1.0) -> None:
        self.refresh()
        threading.Thread(target=self._loop, args=(interval,), name="process-watcher",
                         daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - keep watching whatever one pass met
                logger.exception("refreshing the inference processes failed")

    # ---- one pass ---------------------------------------------------------------------------------
    def refresh(self) -> tuple[ProcessView, ...]:
        with self._lock:
            now = self.clock()
            views = []
            for identity in read_identities(self.state_dir):
                self._unclean.setdefault(identity.model, 0)
                key = (identity.pid, identity.start_ticks)
                dead_since = self._dead.get(key)
                stat = None if dead_since is not None else self.locator.locate(identity)
                if stat is None and dead_since is None:
                    dead_since = self._dead[key] = now
                    if self._refreshed_once:  # a death seen at our own start-up is not counted
                        self._unclean[identity.model] += 1
                    logger.warning("inference process {} ({}) is gone without a clean exit",
                                   identity.pid, identity.model or "no model")
                if dead_since is not None and now - dead_since > self.retention:
                    identity.path.unlink(missing_ok=True)
                    self._dead.pop(key, None)
                    continue
                views.append(ProcessView(identity, stat, dead_since))
            self._views = tuple(views)
            self._refreshed_once = True
            self._drop_dead_gauges(views, now)
            return self._views

    def _drop_dead_gauges(self, views: list[ProcessView], now: float) -> None:
        alive = {v.identity.pid for v in views if v.stat is not None}
        dead = {v.identity.pid for v in views if v.stat is None}
        newest: dict[int, float] = {}
        for path in self.metrics_dir.glob("gauge_live*_*.db"):
            match = _PID_IN_NAME.search(path.name)
            if match is None:
                continue
            pid = int(match.group(1))
            try:
                newest[pid] = max(newest.get(pid, 0.0), path.stat().st_mtime)
            except OSError:
                continue
        for pid, mtime in newest.items():
            if pid in alive:
                continue
            if pid in dead or now - mtime > ORPHAN_GRACE_S:
                mark_process_dead(pid, str(self.metrics_dir))
                logger.info("removed the live gauges of process {}, which is gone", pid)

    # ---- for the collectors ------------------------------------------------------------------
    def views(self) -> tuple[ProcessView, ...]:
        return self._views

    def unclean_exits(self) -> dict[str, int]:
        with self._lock:
            return dict(self._unclean)

    def heartbeat(self, pid: int) -> float | None:
        """The process's last published progress heartbeat (Unix time), from its gauge file."""
        path = self.metrics_dir / f"gauge_liveall_{pid}.db"
        try:
            for key, value, _timestamp, _pos in MmapedDict.read_all_values_from_file(str(path)):
                if key.startswith(_HEARTBEAT_KEY):
                    return value
        except (OSError, ValueError):
            return None
        return None
