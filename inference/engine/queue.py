"""The bounded, thread-safe queue of requests waiting for a batch slot."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from .request import GenerationRequest


class QueueFull(Exception):
    def __init__(self, capacity: int):
        super().__init__(f"the request queue is full ({capacity} requests waiting)")
        self.capacity = capacity


QueueObserver = Callable[[int, "int | None"], None]  # (depth, oldest arrival perf_ns or None)


class RequestQueue:
    """FIFO of waiting requests: ``put`` from the API layer, ``take`` from the engine thread.

    A request that is cancelled or out of time while it waits is removed at once (its slot is
    free for the next caller), and handed back by ``take`` so that the engine can say why.
    """

    def __init__(self, capacity: int, observer: QueueObserver = lambda depth, oldest: None):
        self.capacity = capacity
        self._items: deque[GenerationRequest] = deque()
        self._cond = threading.Condition()
        self._observer = observer
        self._woken = False

    def __len__(self) -> int:
        return len(self._items)

    def _changed(self) -> None:
        self._observer(len(self._items), self._items[0].arrival_ns if self._items else None)

    def put(self, request: GenerationRequest) -> None:
        with self._cond:
            if len(self._items) >= self.capacity:
                raise QueueFull(self.capacity)
            self._items.append(request)
            self._changed()
            self._cond.notify()

    def remove(self, request: GenerationRequest) -> bool:
        """Take a request out before the engine sees it; False if it has already left."""
        with self._cond:
            try:
                self._items.remove(request)
            except ValueError:
                return False
            self._changed()
            return True

    def take(self, limit: int) -> tuple[list[GenerationRequest], list[GenerationRequest]]:
        """Up to ``limit`` live requests in arrival order, and those found dead on the way."""
        live: list[GenerationRequest] = []
        dead: list[GenerationRequest] = []
        now = time.perf_counter_ns()
        with self._cond:
            while self._items and len(live) < limit:
                request = self._items.popleft()
                if request.cancelled or now >= request.deadline_ns:
                    dead.append(request)
                else:
                    live.append(request)
            if live or dead:
                self._changed()
        return live, dead

    def snapshot(self) -> list[GenerationRequest]:
        with self._cond:
            return list(self._items)

    def drain(self) -> list[GenerationRequest]:
        with self._cond:
            items = list(self._items)
            self._items.clear()
            self._changed()
        return items

    def wait(self, timeout: float) -> None:
        """Block until a request is waiting, ``wake`` is called, or the timeout passes."""
        with self._cond:
            if not self._items and not self._woken:
                self._cond.wait(timeout)
            self._woken = False

    def wake(self) -> None:
        with self._cond:
            self._woken = True
            self._cond.notify_all()
