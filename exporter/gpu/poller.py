"""Reads the GPU backend in background threads, so that a scrape never waits on the hardware.

The poll thread reads every GPU each ``interval`` seconds and replaces an immutable snapshot;
the collector reads the snapshot. A call that wedges (a hung driver can block for ever) stalls
only this thread: the scrape still answers at once, the readings age, and past ``max_age`` the
GPU's values are left out and its ``up`` goes to 0. A backend that fails to start, or stops
answering, is re-initialised every ``reinit_interval`` seconds. A second thread waits for XID
events and counts them by GPU and code.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from loguru import logger

from vigil.gpu.backend import BackendUnavailable, GpuBackend, GpuReading, SystemInfo

XID_RETRY_S = 60.0


@dataclass
class GpuState:
    """What the poller last learnt of one GPU."""

    index: int
    reading: GpuReading | None = None
    last_ok: float = 0.0  # Unix time of the last successful read
    lost: bool = False
    error: str = ""
    identity: tuple[str, str] = field(default=("", ""))  # uuid, name: kept after a loss


@dataclass(frozen=True)
class GpuSnapshot:
    backend_up: bool = False
    error: str = ""
    system: SystemInfo | None = None
    gpus: tuple[GpuState, ...] = ()
    # (GPU index, XID code) -> events seen
    xid_counts: dict[tuple[int, int], int] = field(default_factory=dict)
    taken_at: float = 0.0


class GpuPoller:
    def __init__(
        self,
        backend: GpuBackend,
        interval: float = 2.0,
        max_age: float = 30.0,
        reinit_interval: float = 10.0,
        clock: Callable[[], float] = time.time,
    ):
        self.backend = backend
        self.interval = interval
        self.max_age = max_age
        self.reinit_interval = reinit_interval
        self.clock = clock
        self._snapshot = GpuSnapshot()
        self._states: dict[int, GpuState] = {}
        self._xids: dict[tuple[int, int], int] = {}
        self._xid_lock = threading.Lock()
        self._backend_up = False
        self._error = ""
        self._system: SystemInfo | None = None
        self._next_init = 0.0
        self._xid_warned = False
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # ---- threads --------------------------------------------------------------------------------
    def start(self) -> None:
        for target, name in ((self._poll_loop, "gpu-poller"), (self._xid_loop, "gpu-xid-events")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()

    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.poll_once()
            except Exception:  # noqa: BLE001 - the poller must outlive any backend surprise
                logger.exception("GPU poll failed")
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))

    # ---- one poll -------------------------------------------------------------------------------
    def poll_once(self) -> GpuSnapshot:
        now = self.clock()
        if not self._backend_up and now >= self._next_init:
            self._try_init(now)
        if self._backend_up:
            try:
                count = self.backend.device_count()
            except BackendUnavailable as exc:
                self._went_down(str(exc), now)
                count = None
            if count is not None:
                for index in range(count):
                    try:
                        self._read(index)
                    except BackendUnavailable as exc:  # the library failed mid-round
                        self._went_down(str(exc), now)
                        break
                for index in set(self._states) - set(range(count)):  # gone from the bus
                    self._states[index] = replace(
                        self._states[index], lost=True, reading=None, error="no longer enumerated"
                    )
        return self._publish()

    def _try_init(self, now: float) -> None:
        try:
            self.backend.init()
            self._system = self.backend.system_info()
        except BackendUnavailable as exc:
            if self._error != str(exc):
                logger.warning(
                    "GPU backend unavailable; retrying every {} s: {}", self.reinit_interval, exc
                )
            self._went_down(str(exc), now)
            return
        self._backend_up, self._error = True, ""
        logger.info(
            "GPU backend up: driver {}, CUDA {}",
            self._system.driver_version,
            self._system.cuda_version,
        )

    def _went_down(self, error: str, now: float) -> None:
        self._backend_up, self._error = False, error
        self._next_init = now + self.reinit_interval

    def _read(self, index: int) -> None:
        state = self._states.get(index) or GpuState(index=index)
        try:
            reading = self.backend.read(index)
        except BackendUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - GpuLost, or a surprise: only this GPU fails
            if not state.lost:
                logger.error(
                    "GPU {} ({}) lost: {}", index, state.identity[0] or "unknown uuid", exc
                )
            self._states[index] = replace(state, reading=None, lost=True, error=str(exc))
            return
        if state.lost:
            logger.info("GPU {} ({}) answers again", index, reading.uuid)
        self._states[index] = GpuState(
            index=index,
            reading=reading,
            last_ok=self.clock(),
            identity=(reading.uuid, reading.name),
        )

    def _publish(self) -> GpuSnapshot:
        with self._xid_lock:
            xids = dict(self._xids)
        self._snapshot = GpuSnapshot(
            backend_up=self._backend_up,
            error=self._error,
            system=self._system,
            gpus=tuple(self._states[i] for i in sorted(self._states)),
            xid_counts=xids,
            taken_at=self.clock(),
        )
        return self._snapshot

    def snapshot(self) -> GpuSnapshot:
        """The latest snapshot, with the XID counts as of now."""
        snap = self._snapshot
        with self._xid_lock:
            return replace(snap, xid_counts=dict(self._xids))

    # ---- XID events -----------------------------------------------------------------------------
    def _xid_loop(self) -> None:
        while not self._stop.is_set():
            if not self._backend_up:
                self._stop.wait(1.0)
                continue
            if not self.xid_once(1.0):
                self._stop.wait(XID_RETRY_S)

    def xid_once(self, timeout_s: float) -> bool:
        """Wait up to timeout_s for XID events and count them; False when events are
        unavailable (then the caller waits before it tries again)."""
        try:
            events = self.backend.wait_xid(timeout_s)
        except BackendUnavailable as exc:
            if not self._xid_warned:
                logger.warning("XID events unavailable (retrying every {} s): {}", XID_RETRY_S, exc)
                self._xid_warned = True
            return False
        except Exception:  # noqa: BLE001
            logger.exception("waiting for XID events failed")
            return False
        for event in events:
            state = self._states.get(event.index)
            uuid = state.identity[0] if state is not None else ""
            logger.error(
                "XID {} on GPU {} ({})", event.xid, event.index, uuid or "uuid not read yet"
            )
            key = (event.index, event.xid)
            with self._xid_lock:
                self._xids[key] = self._xids.get(key, 0) + 1
        return True
