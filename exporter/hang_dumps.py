"""Hang reports with the Python stacks of a hung engine, dumped with py-spy (``--hang-dumps``).

A target's engine counts as hung when one of its models has had work pending (requests running
or waiting) and no progress for ``--hang-dump-after`` seconds, as the exporter reads them from
the engine's /metrics (exporter/engine_state.py; a frozen engine keeps its last known requests
and no progress). Then, at most once per ``--hang-dump-interval`` per target, in a thread of
its own (never on the scrape path), the exporter runs ``py-spy dump --pid PID`` for the process
listening on the target's port and each of its descendants (exporter/engine_processes.py), each
bounded by a timeout, and logs one JSON line at ERROR, ``engine hang report: ...``, with the
target, engine, model, how long it has stalled, its requests, and ``processes``: a list of
``{pid, role, comm, state, stack}`` (or ``error`` in place of ``stack``), as the inference
process's own stall report does (inference/watchdog.py).

py-spy runs with ``--nonblocking``: a hung engine's stacks stand still, and pausing the process
fails for a stopped one (SIGSTOP) and may block on one in uninterruptible sleep (a wedged
driver call). Only function names, files and lines are written (no locals, no command line).

py-spy reads another process's memory: it needs ptrace permission over the engine's processes
(the same user or root, CAP_SYS_PTRACE, and kernel.yama.ptrace_scope allowing it); in a
container, ``cap_add: [SYS_PTRACE]`` and ``pid: host`` (or the engine's pid namespace). Missing
py-spy or permission gives a warning once and reports without stacks, counted as unavailable.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from loguru import logger

from vigil.procfs import ProcStat

from .background import start_repeating
from .engine_processes import EngineProcessWatcher, EngineView
from .engine_state import ModelState
from .probe import TargetProber

RESULTS = ("ok", "failed", "unavailable")
DUMP_TIMEOUT_S = 20.0  # per process
MAX_PROCESSES = 64  # dumped per report (a large tensor-parallel engine has a dozen)
_SHOWN = 300  # characters of py-spy's error kept
_PERMISSION = ("permission denied", "operation not permitted", "eperm")
PTRACE_HINT = (
    "the exporter needs ptrace permission over the engine's processes: run it as their user or "
    "as root with CAP_SYS_PTRACE (in a container: cap_add: [SYS_PTRACE] and pid: host), and "
    "check kernel.yama.ptrace_scope"
)


class DumpUnavailable(Exception):
    """py-spy cannot be run, or may not read the process."""


class DumpFailed(Exception):
    """py-spy ran and read no stack."""


def find_py_spy(path: str) -> str | None:
    """The py-spy executable: ``path`` itself when it names a file, else looked up on PATH and
    then beside this Python (the bin directory of the exporter's virtual environment, where
    ``pip install py-spy`` puts it)."""
    if os.sep in path:
        return path if os.path.isfile(path) and os.access(path, os.X_OK) else None
    return shutil.which(path) or shutil.which(path, path=os.path.dirname(sys.executable))


def format_threads(threads: list[dict[str, Any]]) -> str:
    """py-spy's ``--json`` dump as text: each thread, then its frames, innermost first."""
    parts = []
    for thread in threads:
        states = ["active" if thread.get("active") else "idle"]
        if thread.get("owns_gil"):
            states.append("gil")
        ident = thread.get("os_thread_id") or thread.get("thread_id")
        head = f"Thread {ident} ({', '.join(states)})"
        if thread.get("thread_name"):  # known once the process has imported threading
            head += f': "{thread["thread_name"]}"'
        frames = [
            f"    {frame.get('name')} ({frame.get('short_filename') or frame.get('filename')}:"
            f"{frame.get('line')})"
            for frame in thread.get("frames") or ()
        ]
        parts.append("\n".join([head, *frames]))
    return "\n".join(parts)


def dump_stack(py_spy: str, pid: int, timeout: float = DUMP_TIMEOUT_S) -> str:
    """The Python stacks of ``pid``'s threads; DumpUnavailable or DumpFailed saying why not."""
    command = [py_spy, "dump", "--pid", str(pid), "--nonblocking", "--json"]
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, errors="replace", timeout=timeout
        )
    except subprocess.TimeoutExpired:
        raise DumpFailed(f"py-spy took longer than {timeout:g} s") from None
    except OSError as exc:
        raise DumpUnavailable(f"cannot run {py_spy}: {exc.strerror or exc}") from None
    if result.returncode != 0:
        output = f"{result.stderr}\n{result.stdout}"
        error = _py_spy_error(output) or f"exit status {result.returncode}"
        if any(word in error.lower() for word in _PERMISSION):
            raise DumpUnavailable(f"py-spy may not read pid {pid}: {error}")
        raise DumpFailed(f"py-spy: {error}")
    try:
        threads = json.loads(result.stdout)
        if not isinstance(threads, list):
            raise ValueError("not a list of threads")
    except ValueError as exc:
        raise DumpFailed(f"py-spy's output is not its JSON dump ({exc})") from None
    if not threads:
        raise DumpFailed("py-spy found no Python thread")
    return format_threads(threads)


def _py_spy_error(output: str) -> str:
    """py-spy's error and its causes on one line, without its own backtrace."""
    lines = []
    for line in output.strip().splitlines():
        if line.strip() == "Stack backtrace:":
            break
        if line.strip() and line.strip() != "Caused by:":
            lines.append(line.strip())
    return "; ".join(lines)[:_SHOWN]


@dataclass(frozen=True)
class Hang:
    target: str
    engine: str
    model: str  # as published (the target's model where the engine has no model label)
    stalled_for_s: float
    running: float | None
    waiting: float | None


class HangDumper:
    """Watches the probers' engine state; dumps and reports a hung engine's stacks."""

    def __init__(
        self,
        probers: Sequence[TargetProber],
        engines: EngineProcessWatcher | None,
        after: float = 120.0,
        interval: float = 600.0,
        py_spy: str = "py-spy",
        timeout: float = DUMP_TIMEOUT_S,
        clock: Callable[[], float] = time.time,
        check_every: float | None = None,
    ):
        self.probers, self.engines = list(probers), engines
        self.after, self.interval, self.timeout = after, interval, timeout
        self.py_spy, self.clock = py_spy, clock
        self.check_every = check_every or min(1.0, max(0.1, after / 10))
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str, str], int] = {}
        self._last_dump: dict[str, float] = {}
        self._dumping: set[str] = set()
        self._warned: set[str] = set()
        self._stop = threading.Event()

    def start(self) -> None:
        if not self.probers:
            return
        if find_py_spy(self.py_spy) is None:  # said now, not first when an engine hangs
            self._warn_py_spy_missing()
        start_repeating(
            "hang-dumps",
            self.check_every,
            self.check,
            self._stop,
            "checking the engines for a hang",
        )

    def stop(self) -> None:
        self._stop.set()

    def counts(self) -> dict[tuple[str, str, str], int]:
        """(target, engine, result) -> hang reports written."""
        with self._lock:
            return dict(self._counts)

    def check(self) -> list[threading.Thread]:
        """Start a report for each target hung now and not reported within the interval; the
        threads started."""
        now = self.clock()
        started = []
        for prober in self.probers:
            hang = self._hang(prober, now)
            if hang is None:
                continue
            with self._lock:
                last = self._last_dump.get(hang.target)
                if hang.target in self._dumping or (
                    last is not None and now - last < self.interval
                ):
                    continue
                self._dumping.add(hang.target)
                self._last_dump[hang.target] = now
            thread = threading.Thread(
                target=self._report_safely, args=(hang,), name="hang-dump", daemon=True
            )
            thread.start()
            started.append(thread)
        return started

    def _hang(self, prober: TargetProber, now: float) -> Hang | None:
        state = prober.state()
        snapshot = state.engine_state
        if state.engine is None or snapshot is None:
            return None
        with self._lock:  # every result shown from the start, 0 until it happens
            for result in RESULTS:
                self._counts.setdefault((state.label, snapshot.engine, result), 0)
        stalled: list[tuple[float, ModelState]] = [
            (m.stalled_for(now), m) for m in snapshot.models if m.pending
        ]
        if not stalled:
            return None
        seconds, model = max(stalled, key=lambda pair: pair[0])
        if seconds < self.after:
            return None
        return Hang(
            state.label,
            snapshot.engine,
            model.model or state.model or state.label,
            seconds,
            model.running,
            model.waiting,
        )

    def _report_safely(self, hang: Hang) -> None:
        try:
            self.report(hang)
        except Exception:  # noqa: BLE001 - a bug here must not end the exporter
            logger.exception("the hang report of {} failed", hang.target)
        finally:
            with self._lock:
                self._dumping.discard(hang.target)

    def report(self, hang: Hang) -> tuple[str, list[dict[str, Any]]]:
        """Dump the stacks, log the report and count it; the result and the processes."""
        processes: list[dict[str, Any]] = []
        view = self._view(hang.target)
        py_spy = find_py_spy(self.py_spy)
        if view is None:
            result, reason = "unavailable", "the target is not on this host"
        elif not view.processes:
            result = "unavailable"
            reason = f"no process found behind its port ({view.problem or 'none listens'})"
        elif py_spy is None:
            result = "unavailable"
            reason = f"py-spy not found (--py-spy {self.py_spy})"
        else:
            processes = self._dump_all(view, py_spy)
            stacks = sum(1 for p in processes if "stack" in p)
            if stacks:
                result, reason = "ok", f"{stacks} of {len(processes)} process stacks dumped"
            elif any(p.get("unavailable") for p in processes):
                result, reason = "unavailable", "py-spy may not read the engine's processes"
            else:
                result, reason = "failed", "py-spy read no stack"
            for entry in processes:
                entry.pop("unavailable", None)
        self._warn_once(hang, result, reason)
        logger.bind(
            target=hang.target,
            engine=hang.engine,
            model=hang.model,
            stalled_for_s=round(hang.stalled_for_s, 3),
            hang_dump_after_s=self.after,
            requests_running=hang.running,
            requests_waiting=hang.waiting,
            result=result,
            processes=processes,
        ).error(
            "engine hang report: {} behind {} has had work pending ({} running, {} waiting) and "
            "no progress for {:.1f} s (threshold {:g} s); {}",
            hang.engine,
            hang.target,
            _count(hang.running),
            _count(hang.waiting),
            hang.stalled_for_s,
            self.after,
            reason,
        )
        with self._lock:
            key = (hang.target, hang.engine, result)
            self._counts[key] = self._counts.get(key, 0) + 1
        return result, processes

    def _view(self, target: str) -> EngineView | None:
        views = self.engines.views() if self.engines is not None else ()
        return next((v for v in views if v.target == target), None)

    def _dump_all(self, view: EngineView, py_spy: str) -> list[dict[str, Any]]:
        processes = []
        for stat in view.processes[:MAX_PROCESSES]:
            entry = _describe(stat, view.listener)
            try:
                entry["stack"] = dump_stack(py_spy, stat.pid, self.timeout)
            except DumpUnavailable as exc:
                entry["error"], entry["unavailable"] = str(exc), True
            except DumpFailed as exc:
                entry["error"] = str(exc)
            processes.append(entry)
        return processes

    def _warn_once(self, hang: Hang, result: str, reason: str) -> None:
        if result != "unavailable":
            return
        if reason.startswith("py-spy not found"):
            self._warn_py_spy_missing()
            return
        if reason.startswith("py-spy may not"):
            key, message = "ptrace", f"{reason}: {PTRACE_HINT}"
        else:
            key = f"view {hang.target}"
            message = f"no Python stacks for {hang.target}: {reason}"
        self._warn(key, message)

    def _warn_py_spy_missing(self) -> None:
        self._warn(
            "py-spy",
            f"py-spy not found (--py-spy {self.py_spy}): hang reports come without Python "
            "stacks; install it (pip install py-spy) or name it with --py-spy PATH",
        )

    def _warn(self, key: str, message: str) -> None:
        with self._lock:
            if key in self._warned:
                return
            self._warned.add(key)
        logger.warning(message)


def _describe(stat: ProcStat, listener: int | None) -> dict[str, Any]:
    return {
        "pid": stat.pid,
        "role": "listener" if stat.pid == listener else "child",
        "comm": stat.comm,
        "state": stat.state,
    }


def _count(value: float | None) -> str:
    return "?" if value is None else f"{value:g}"
