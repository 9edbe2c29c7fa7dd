"""What a person reads: one line per notification event on stdout, with the time, flushed at
once (the stack runner and `docker compose logs` show it as it comes). The JSON log lines go to
stderr, for machines."""

from __future__ import annotations

import sys
import threading
from datetime import UTC, datetime
from typing import TextIO

from loguru import logger


class Console:
    def __init__(self, stream: TextIO | None = None):
        self._stream = stream
        self._lock = threading.Lock()
        self._broken = False

    def print(self, text: str) -> None:
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        stream = self._stream or sys.stdout
        with self._lock:  # lines of concurrent requests never interleave
            try:
                for line in text.splitlines() or [""]:
                    stream.write(f"{stamp} {line}\n")
                stream.flush()
            except (OSError, ValueError) as exc:  # stdout closed: the log still has it all
                if not self._broken:
                    self._broken = True
                    logger.error("cannot print the notifications on stdout any more: {}", exc)
