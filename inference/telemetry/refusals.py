"""Refusals logged as a summary: under a storm of 429s a line per refusal would fill the disk
and take the CPU that serving needs (a 537-byte WARNING each, 82 MB in 8 minutes, was seen).

The first refusal of an interval is logged in full, as before, so a refusal is never silent;
the others of that interval are counted per reason and logged as one line when it ends. The
metrics (``inference_requests_total`` by status and error type) stay exact: they are recorded
for every request, whatever is logged.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

from loguru import logger

SUMMARY_INTERVAL_S = 10.0


def is_refusal(status: int, started: bool) -> bool:
    """A request turned away before the engine had it: the queue full (429), the server not
    ready or stalled (503)."""
    return status == 429 or (status == 503 and not started)


class RefusalLog:
    """``fields`` go on the summary line (the recorder's carry a request's last-line fields,
    event request_end with outcome and status, so that the query for failed requests finds the
    summed ones too), at ``level``."""

    def __init__(
        self,
        interval_s: float = SUMMARY_INTERVAL_S,
        timer: Callable[[float, Callable[[], None]], Any] | None = None,
        fields: dict[str, Any] | None = None,
        level: str = "WARNING",
    ):
        self.interval_s = interval_s
        self.fields = fields or {}
        self.level = level
        self._timer = timer or _daemon_timer
        self._lock = threading.Lock()
        self._open = False  # an interval has begun: its refusals are being counted
        self._counts: Counter[str] = Counter()

    def refused(self, log_in_full: Callable[[], None], reason: str) -> None:
        """Log this refusal in full (the first of an interval) or count it for the summary."""
        with self._lock:
            if self._open:
                self._counts[reason] += 1
                return
            self._open = True
        log_in_full()
        self._timer(self.interval_s, self.flush)

    def flush(self) -> None:
        """End the interval: one line for the refusals it counted (none if there were none)."""
        with self._lock:
            counts, self._counts = self._counts, Counter()
            self._open = False
        if not counts:
            return
        total = sum(counts.values())
        logger.bind(refusals=dict(counts), interval_s=self.interval_s, **self.fields).log(
            self.level,
            "{} more request(s) refused in the last {:g} s: {}",
            total,
            self.interval_s,
            ", ".join(f"{reason} {count}" for reason, count in counts.most_common()),
        )


def _daemon_timer(seconds: float, action: Callable[[], None]) -> threading.Timer:
    timer = threading.Timer(seconds, action)
    timer.daemon = True
    timer.start()
    return timer
