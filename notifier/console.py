"""What a person reads: one line per notification event on stdout, with the time, flushed at
once (the stack runner and `docker compose logs` show it as it comes). The JSON log lines go to
stderr, for machines.

Printing never holds up the webhooks or the relays: the process's stdout is written by a
thread of its own from a bounded queue, so that a reader that stopped (a full pipe, a paused
`| less`) blocks only that thread. While the queue is full, lines are dropped and counted
(``vigil_notifier_console_lines_dropped_total``, one ERROR line in the log, which has every
notification anyway), and the count is printed once lines flow again. A stdout that is closed is
logged once, then ignored."""

from __future__ import annotations

import os
import queue
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TextIO

from loguru import logger

# Print calls waiting for the writer at most (one per event, about 300 bytes each): 1,000 is a
# few hundred kilobytes held for a reader that pauses, on top of the pipe's own buffer.
MAX_QUEUED = 1000

_CLOSE = object()


class Console:
    """``Console()`` prints on the process's stdout through the queue and its writer thread;
    ``Console(stream)`` writes to ``stream`` at once (for a caller that owns the stream)."""

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        max_queued: int = MAX_QUEUED,
        on_dropped: Callable[[int], None] | None = None,
    ):
        self._stream = stream
        self._lock = threading.Lock()
        self._broken = False
        self._on_dropped = on_dropped
        self._dropped = 0  # lines dropped since the last note of them
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        if stream is None:
            self._queue = queue.Queue(max_queued)
            self._thread = threading.Thread(target=self._write_queued, name="console", daemon=True)
            self._thread.start()

    def print(self, text: str) -> None:
        """Print ``text``, each of its lines stamped with the time; never waits for stdout."""
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        lines = [f"{stamp} {line}\n" for line in text.splitlines() or [""]]
        if self._queue is None:
            with self._lock:  # lines of concurrent requests never interleave
                self._write("".join(lines))
            return
        try:
            self._queue.put_nowait("".join(lines))
        except queue.Full:
            with self._lock:
                first = self._dropped == 0
                self._dropped += len(lines)
            if first:
                logger.error(
                    "console lines are being dropped: stdout is not being read (the log has "
                    "every notification); their number is printed when it is read again"
                )
            if self._on_dropped is not None:
                self._on_dropped(len(lines))

    def close(self, grace: float = 2.0) -> None:
        """Print what is queued, waiting at most ``grace`` seconds for stdout."""
        if self._queue is None or self._thread is None:
            return
        try:
            self._queue.put(_CLOSE, timeout=grace)
        except queue.Full:
            return
        self._thread.join(grace)

    def _write_queued(self) -> None:
        while (chunk := self._queue.get()) is not _CLOSE:
            with self._lock:
                dropped, self._dropped = self._dropped, 0
            if dropped:
                stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
                self._write(
                    f"{stamp} ... {dropped} console line{'s' if dropped != 1 else ''} dropped "
                    "while stdout was not being read (the log on stderr has them)\n"
                )
            self._write(chunk)

    def _write(self, chunk: str) -> None:
        if self._broken:
            return
        try:
            if self._stream is not None:
                self._stream.write(chunk)
                self._stream.flush()
            else:
                _write_stdout(chunk)
        except (OSError, ValueError) as exc:  # stdout closed: the log still has it all
            self._broken = True
            logger.error("cannot print the notifications on stdout any more: {}", exc)


def _write_stdout(chunk: str) -> None:
    """To the process's stdout: to its file descriptor where it has one, so that a write that
    blocks holds no lock of Python's (a flush at exit would wait for it), else as text."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by an object without one
        sys.stdout.write(chunk)
        sys.stdout.flush()
        return
    data = memoryview(chunk.encode("utf-8", errors="replace"))
    while data:
        data = data[os.write(fd, data) :]
