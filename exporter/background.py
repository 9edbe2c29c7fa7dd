"""The exporter's background threads: each repeats one pass off the scrape path, and a pass that
fails is logged and the next one runs all the same (a watcher must outlive its own bugs)."""

from __future__ import annotations

import threading
from collections.abc import Callable

from loguru import logger


def start_repeating(
    name: str, interval: float, work: Callable[[], object], stop: threading.Event, what: str
) -> threading.Thread:
    """Run ``work`` every ``interval`` seconds in a daemon thread until ``stop`` is set; ``what``
    names the pass in the log line of a failure."""

    def loop() -> None:
        while not stop.wait(interval):
            try:
                work()
            except Exception:  # noqa: BLE001 - keep watching whatever one pass met
                logger.exception("{} failed", what)

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    return thread
