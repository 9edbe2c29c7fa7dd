"""The processes of the stack without Docker (vigil.stack): each started so that it dies with
the stack, logging into its own file (and, for the notifier, onto the console too).

Dying with the stack: a stack killed without a chance to stop its parts (SIGKILL, the OOM
killer) used to leave Prometheus, Alertmanager and the exporter running, holding their ports,
so that the next start found them busy. Each part is started with Linux's
``prctl(PR_SET_PDEATHSIG, SIGKILL)``: the kernel kills it when the thread that started it ends
(the stack starts every part, restarts included, from its main thread, so: when the stack
ends). SIGKILL rather than SIGTERM: a stack that died could not wait for a graceful stop, and a
frozen inference process may never finish one. Each part also gets its own process group
(``process_group=0``), so that Ctrl-C in the terminal reaches the stack alone, which then stops
the parts in order.

A console that goes away (the stack's standard output a pipe whose reader ended, a terminal
that hung up) ends nothing: the lines meant for it are dropped, the notifier's lines still go
to its log file, and every part keeps running.
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
# Why each stream the console lines went to failed (a broken pipe, say), by stream: nothing is
# written to it again.
_lost: dict[IO[str], str] = {}


def say(line: str = "", stream: IO[str] | None = None) -> bool:
    """One line on the console (the notifier's reader thread writes there too); False when the
    console cannot be written, now or since an earlier line failed (console_lost() says why).

    A failed stream is pointed at /dev/null, as Python's documentation recommends for a
    BrokenPipeError (signal module, "Note on SIGPIPE"): the bytes left in its buffer, flushed
    at exit, would fail again and turn the stack's exit status into 120."""
    target = stream or sys.stdout
    with _console:
        if target in _lost:
            return False
        try:
            print(line, file=target, flush=True)
            return True
        except (OSError, ValueError) as exc:  # EPIPE, EIO from a hung-up terminal; closed
            _lost[target] = f"{type(exc).__name__}: {exc}"
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, target.fileno())
                os.close(devnull)
            except (OSError, ValueError):  # no file descriptor (a test's capture, say)
                pass
            return False


def console_lost(stream: IO[str] | None = None) -> str | None:
    """Why the console (``stream``, else standard output) can no longer be written; None while
    it can."""
    return _lost.get(stream or sys.stdout)


def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _prctl()  # resolved once, in the parent: the child only calls it


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that asks for SIGKILL when the parent ends (None where prctl is not
    to be had). Should the parent end before the prctl took effect, the child kills itself at
    once instead of living on unwatched.

    Python's documentation calls preexec_fn unsafe when the process has threads (the notifier's
    reader thread is alive when later parts and restarts are spawned): between fork and exec
    the child may block forever on a lock another thread held at the fork. What runs here
    takes no such lock: a foreign function resolved in the parent (no dlsym, no import), a
    prctl, getppid and kill (system calls), a comparison; CPython resets its own state after
    the fork for preexec_fn (PyOS_AfterFork_Child), and glibc's malloc is fork-safe. Nothing
    here logs, prints, imports or opens a file. The process group is Popen's
    ``process_group=0``, not a setpgid here, as the documentation advises.

    Why not ``setpriv --pdeathsig KILL`` (util-linux 2.33+), which would need no Python in the
    child: it is missing on some hosts (this code would still be needed there), and it cannot
    see that the parent died before its prctl (the check below), a death it would then miss."""
    if _PRCTL is None:
        return None
    parent = os.getpid()
    prctl, getpid, getppid, kill = _PRCTL, os.getpid, os.getppid, os.kill
    sigkill = int(signal.SIGKILL)

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, sigkill, 0, 0, 0)
        if getppid() != parent:
            kill(getpid(), sigkill)

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
    its log, on standard error, goes to the file only). ``notes``: more lines the banner prints
    under the pages (how else to see what the part has, where it has no page to open)."""

    name: str
    command: list[str]
    log_path: Path
    pages: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
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
            process_group=0,
            preexec_fn=die_with_parent(),  # noqa: PLW1509 - see die_with_parent
        )
        if self.echo:
            self._reader = threading.Thread(
                target=self._tee, args=(self.process.stdout, self._log), daemon=True
            )
            self._reader.start()

    def _tee(self, stream: IO[bytes], log: IO[bytes]) -> None:
        """Each line of the part's standard output into its log, then onto the console. Keeps
        reading whatever becomes of the console: a reader that stopped would leave the part
        blocked on a full pipe (the notifier, in the middle of a webhook)."""
        echo = True
        with stream:
            for raw in stream:
                _write(log, raw)
                line = raw.decode("utf-8", errors="replace").rstrip()
                if echo and not say(f"{self.name} | {line}"):
                    echo = False
                    _write(
                        log,
                        f"vigil.stack: the stack's console cannot be written ({console_lost()}): "
                        f"{self.name}'s lines from here on are in this file only\n".encode(),
                    )

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


def _write(log: IO[bytes], data: bytes) -> None:
    try:
        log.write(data)
        log.flush()
    except (OSError, ValueError):  # a full disk; closed by stop() after its wait
        pass
