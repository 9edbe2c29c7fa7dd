"""Serving until told to stop, the same way in every long-running process of the light install
(the exporter, the notifier): the main thread waits for SIGINT or SIGTERM while the servers and
workers run in their threads, then the caller stops them."""

from __future__ import annotations

import signal
import time


def wait_for_stop(poll_s: float = 0.2) -> int:
    """Block until SIGINT or SIGTERM arrives; return its number.

    The handler only appends to a list: taking a lock in a signal handler (``Event.set``)
    deadlocks when a second signal arrives while the first handler holds it.
    """
    stopping: list[int] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda signum, _frame: stopping.append(signum))
    while not stopping:
        time.sleep(poll_s)
    return stopping[0]
