"""What a person reads: one line per notification event on stdout, with the time, flushed at
once (the stack runner and `docker compose logs` show it as it comes). The JSON log lines go to
stderr, for machines."""

from __future__ import annotations

import sys
import threading
from datetime import UTC, datetime
from typing import TextIO


class Console:
    def __init__(self, stream: TextIO | None = None):
        self._stream = stream
        self._lock = threading.Lock()

    def print(self, text: str) -> None:
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        stream = self._stream or sys.stdout
        with self._lock:  # lines of concurrent requests never interleave
            for line in text.splitlines() or [""]:
                stream.write(f"{stamp} {line}\n")
            stream.flush()
