"""The processes of the stack without Docker (vigil.stack): each started so that it dies with
the stack, logging into its own file (and, for the notifier, onto the console too).

Dying with the stack: a stack killed without a chance to stop its parts (SIGKILL, the OOM
killer) used to leave Prometheus, Alertmanager and the exporter running, holding their ports,
so that the next start found them busy. Each part is started with Linux's
``prctl(PR_SET_PDEATHSIG, SIGKILL)``: the kernel kills it when the thread that started it ends
(the stack starts every part, restarts included, from its main thread, so: when the stack
ends). SIGKILL rather than SIGTERM: a stack that died could not wait for a graceful stop, and a
frozen inference process may never finish one. Each part also gets its own process group, so
that Ctrl-C in the terminal reaches the stack alone, which then stops the parts in order.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

PR_SET_PDEATHSIG = 1  # include/uapi/linux/prctl.h
TAIL_LINES = 15
_console = threading.Lock()


def say(line: str = "", stream: IO[str] | None = None) -> None:
    """One line on the console (the notifier's reader thread writes there too)."""
    with _console:
        print(line, file=stream or sys.stdout, flush=True)


def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _prctl()  # resolved once, in the parent: the child only calls it


def die_with_parent() -> Callable[[], None]:
    """A ``preexec_fn`` (runs in the child between fork and exec): its own process group, and
    SIGKILL when the parent ends. Should the parent end before the prctl took effect, the child
    kills itself at once instead of living on unwatched."""
    parent = os.getpid()

    def preexec() -> None:
        os.setpgid(0, 0)
        if _PRCTL is not None:
            _PRCTL(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def log_tail(path: Path, lines: int = TAIL_LINES) -> list[str]:
    """The last ``lines`` lines of a log file (empty when it cannot be read)."""
    try:
        with open(path, "rb") as log:
            log.seek(0, os.SEEK_END)
            log.seek(max(0, log.tell() - 64 * 1024))
            text = log.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    return text.splitlines()[-lines:]


@dataclass
class Part:
    """One process of the stack. ``pages``: (label, URL) pairs the start-up banner prints, the
    first beside the part's name; every one opens in a browser (a label that says otherwise is
    the exception, e.g. the API base). ``port`` and ``option``: the port it listens on and the
    stack's option that chooses it, checked free before anything starts. ``echo``: its standard
    output also goes to the console, each line after ``name | `` (the notifier's notifications;
    its log, on standard error, goes to the file only)."""

    name: str
    command: list[str]
    log_path: Path
    pages: list[tuple[str, str]] = field(default_factory=list)
    port: int | None = None
    option: str | None = None
    restart: bool = False
    echo: bool = False
    env: dict[str, str] | None = None
    process: subprocess.Popen | None = None
    restarts: int = 0
    _log: IO[bytes] | None = field(default=None, repr=False)
    _reader: threading.Thread | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return self.pages[0][1] if self.pages else ""

    def start(self, cwd: Path) -> None:
        if self._log is None:
            self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        env = None if self.env is None else {**os.environ, **self.env}
        self.process = subprocess.Popen(
            self.command,
            stdout=subprocess.PIPE if self.echo else self._log,
            stderr=self._log,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            env=env,
            preexec_fn=die_with_parent(),  # noqa: PLW1509 - prctl must run in the child
        )
        if self.echo:
            self._reader = threading.Thread(
                target=self._tee, args=(self.process.stdout, self._log), daemon=True
            )
            self._reader.start()

    def _tee(self, stream: IO[bytes], log: IO[bytes]) -> None:
        with stream:
            for raw in stream:
                say(f"{self.name} | {raw.decode('utf-8', errors='replace').rstrip()}")
                try:
                    log.write(raw)
                    log.flush()
                except (OSError, ValueError):  # closed by stop() after its wait
                    pass

    def stop(self, grace: float = 15.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._reader is not None:
            self._reader.join(5)
            self._reader = None
        if self._log is not None:
            self._log.close()
            self._log = None
