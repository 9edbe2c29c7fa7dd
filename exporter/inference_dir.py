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

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loguru import logger
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import mark_process_dead

from vigil import statedir
from vigil.statedir import Identity, read_identities

from .background import start_repeating
from .procview import ProcessLocator, ProcStat, ProcUnreadable

# Files of a pid with no identity file (the process exited cleanly, or its identity is not
# written yet) are dropped only once they have not changed for this long.
ORPHAN_GRACE_S = 60.0
# Lookups in a row that must find the process gone before it counts as dead: one odd /proc read
# must not bury a live process (and delete its gauges).
MISSES_FOR_DEAD = 2
_HEARTBEAT_KEY = f'["{statedir.HEARTBEAT_METRIC}"'


@dataclass(frozen=True)
class ProcessView:
    identity: Identity
    stat: ProcStat | None  # None: gone
    dead_since: float | None


class InferenceDirectory:
    def __init__(
        self,
        state_dir: str | Path,
        retention: float = 600.0,
        locator: ProcessLocator | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.state_dir = Path(state_dir)
        self.metrics_dir = statedir.metrics_dir(self.state_dir)
        self.retention = retention
        self.locator = locator or ProcessLocator()
        self.clock = clock
        self._dead: dict[tuple[int, int | None], float] = {}  # identity key -> when seen gone
        self._unclean: dict[str, int] = {}  # model -> unclean exits witnessed
        self._unclean_published: dict[str, int] = {}
        self._misses: dict[tuple[int, int | None], int] = {}
        self._views: tuple[ProcessView, ...] = ()
        self._refreshed_once = False
        self._lock = threading.Lock()
        self._stop = threading.Event()

    # ---- the watcher thread -----------------------------------------------------------------
    def start(self, interval: float = 1.0) -> None:
        self.refresh()
        start_repeating(
            "process-watcher",
            interval,
            self.refresh,
            self._stop,
            "refreshing the inference processes",
        )

    def stop(self) -> None:
        self._stop.set()

    # ---- one pass ----------------------------------------------------------------------------
    def refresh(self) -> tuple[ProcessView, ...]:
        with self._lock:
            now = self.clock()
            views = []
            for identity in read_identities(self.state_dir):
                self._unclean.setdefault(identity.model, 0)
                view = self._look(identity, now)
                if view is not None:
                    views.append(view)
            self._views = tuple(views)
            self._unclean_published = dict(self._unclean)
            self._refreshed_once = True
            self._drop_dead_gauges(views)
            return self._views

    def _look(self, identity: Identity, now: float) -> ProcessView | None:
        key = (identity.pid, identity.start_ticks)
        try:
            stat = self.locator.locate(identity)
        except ProcUnreadable as exc:  # unknown: keep what we knew
            logger.warning("cannot read the state of process {}: {}", identity.pid, exc)
            previous = self._previous(key)
            return previous
        dead_since = self._dead.get(key)
        if stat is not None:
            self._misses.pop(key, None)
            if dead_since is not None:  # it was not dead after all
                self._dead.pop(key, None)
            return ProcessView(identity, stat, None)
        if dead_since is None:
            self._misses[key] = self._misses.get(key, 0) + 1
            if self._misses[key] < MISSES_FOR_DEAD:
                return self._previous(key)
            if not identity.path.exists():
                return None  # it removed its identity as it exited: a clean exit
            dead_since = self._dead[key] = now
            self._misses.pop(key, None)
            if self._refreshed_once:  # a death seen at our own start-up is not counted
                self._unclean[identity.model] += 1
            logger.warning(
                "inference process {} ({}) is gone without a clean exit",
                identity.pid,
                identity.model or "no model",
            )
        if now - dead_since > self.retention:
            self._forget(identity, key)
            return None
        return ProcessView(identity, None, dead_since)

    def _previous(self, key: tuple[int, int | None]) -> ProcessView | None:
        for view in self._views:
            if (view.identity.pid, view.identity.start_ticks) == key:
                return view
        return None

    def _forget(self, identity: Identity, key: tuple[int, int | None]) -> None:
        """Remove a dead process's identity file, unless a new process with the same pid (a
        restarted container's pid 1) has replaced it meanwhile."""
        self._dead.pop(key, None)
        try:
            current = statedir.parse_identity(identity.path, identity.path.read_text())
        except (OSError, ValueError, KeyError, TypeError):
            return
        if current.start_ticks == identity.start_ticks:
            identity.path.unlink(missing_ok=True)

    def _drop_dead_gauges(self, views: list[ProcessView]) -> None:
        alive = {v.identity.pid for v in views if v.stat is not None}
        died = {v.identity.pid: v.dead_since for v in views if v.dead_since is not None}
        newest: dict[int, float] = {}
        for path in self.metrics_dir.glob(statedir.LIVE_GAUGE_GLOB):
            pid = statedir.pid_of_file(path)
            if pid is None:
                continue
            try:
                newest[pid] = max(newest.get(pid, 0.0), path.stat().st_mtime)
            except OSError:
                continue
        now = time.time()  # file times are wall-clock
        for pid, mtime in newest.items():
            if pid in alive:
                continue
            if pid in died:
                # Only files the dead process wrote: a new process with the same pid (a
                # restarted container) creates its own after the death was seen.
                if mtime > died[pid]:
                    continue
            elif now - mtime <= ORPHAN_GRACE_S:
                continue  # no identity yet (starting) or just exited cleanly: wait
            mark_process_dead(pid, str(self.metrics_dir))
            logger.info("removed the live gauges of process {}, which is gone", pid)

    # ---- for the collectors ------------------------------------------------------------------
    def views(self) -> tuple[ProcessView, ...]:
        return self._views

    def unclean_exits(self) -> dict[str, int]:
        return self._unclean_published  # replaced whole by refresh(): no lock on the scrape

    def heartbeat(self, pid: int) -> float | None:
        """The process's last published progress heartbeat (Unix time), from its gauge file."""
        path = statedir.live_gauge_file(self.state_dir, pid)
        try:
            for key, value, _timestamp, _pos in MmapedDict.read_all_values_from_file(str(path)):
                if key.startswith(_HEARTBEAT_KEY):
                    return value
        except Exception:  # noqa: BLE001 - a file being created or torn: no heartbeat this time
            return None
        return None
