"""Hang reports of a foreign engine with py-spy: the Python stacks of real processes (stopped
ones too), the reasons none can be had (no py-spy, no ptrace permission, another host, not a
Python process), and end to end: our server frozen with SIGSTOP while it has work, watched by
the exporter as a foreign engine (no shared state directory)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import start_exporter, start_server
from loguru import logger
from test_engine_state import LLAMA, vllm

from exporter.engine_processes import EngineProcessWatcher
from exporter.hang_dumps import (
    DumpFailed,
    DumpUnavailable,
    Hang,
    HangDumper,
    dump_stack,
    find_py_spy,
)
from exporter.probe import TargetProber
from vigil.logs import format_record

PY_SPY = find_py_spy("py-spy")
needs_py_spy = pytest.mark.skipif(
    PY_SPY is None, reason="py-spy is not installed (pip install py-spy)"
)

# A Python process whose stack is known: it waits in a function of its own.
WAITER = """
import time
def waiting_for_the_test():
    print("ready", flush=True)
    time.sleep(600)
waiting_for_the_test()
"""


@pytest.fixture
def logs():
    """The exporter's log records, as the JSON lines it would write."""
    lines: list[dict] = []
    handler = logger.add(lambda m: lines.append(json.loads(format_record(m.record))), level="INFO")
    yield lines
    logger.remove(handler)


@pytest.fixture
def engine(tmp_path):
    """A real Python process serving an engine's /metrics (python -m http.server over a
    directory that holds a file named metrics), vLLM with work pending."""
    (tmp_path / "metrics").write_text(vllm())
    process = subprocess.Popen(
        [sys.executable, "-u", "-m", "http.server", "-b", "127.0.0.1", "-d", str(tmp_path), "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    match = re.search(r"port (\d+)", process.stdout.readline())
    assert match, "python -m http.server did not say its port"
    yield process, f"http://127.0.0.1:{match.group(1)}"
    process.kill()
    process.wait()


def _waiter() -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", WAITER], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    return process


def _later(seconds: float):
    return lambda: time.time() + seconds


def _reports(lines: list[dict]) -> list[dict]:
    return [line for line in lines if line["message"].startswith("engine hang report")]


@needs_py_spy
def test_the_stack_of_a_stopped_python_process_is_dumped():
    process = _waiter()
    try:
        process.send_signal(signal.SIGSTOP)  # a paused dump would fail here: --nonblocking
        stack = dump_stack(PY_SPY, process.pid)
        assert stack.startswith(f"Thread {process.pid} (idle)")
        assert re.search(r"^    waiting_for_the_test \(<string>:\d+\)$", stack, re.MULTILINE), stack
    finally:
        process.kill()
        process.wait()


@needs_py_spy
def test_what_py_spy_cannot_do_is_said():
    sleeper = subprocess.Popen(["sleep", "600"])
    try:
        with pytest.raises(DumpFailed, match="py-spy: .*python version"):
            dump_stack(PY_SPY, sleeper.pid)
    finally:
        sleeper.kill()
        sleeper.wait()
    with pytest.raises(DumpFailed, match="Check that the process is running"):
        dump_stack(PY_SPY, 2**22 + 12345)  # above the largest pid
    with pytest.raises(DumpUnavailable, match="cannot run /nonexistent/py-spy"):
        dump_stack("/nonexistent/py-spy", os.getpid())
    assert find_py_spy("/nonexistent/py-spy") is None
    assert find_py_spy("no-such-py-spy-anywhere") is None


@needs_py_spy
@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv to run py-spy as an unprivileged user",
)
def test_without_ptrace_permission_the_dump_is_unavailable(tmp_path, engine, logs):
    """The real py-spy, run as nobody, against processes of root's."""
    as_nobody = tmp_path / "py-spy-as-nobody"
    as_nobody.write_text(
        f'#!/bin/sh\nexec setpriv --reuid=65534 --regid=65534 --clear-groups {PY_SPY} "$@"\n'
    )
    as_nobody.chmod(0o755)
    process = _waiter()
    try:
        with pytest.raises(DumpUnavailable, match="(?i)py-spy may not read pid .*permission"):
            dump_stack(str(as_nobody), process.pid)
    finally:
        process.kill()
        process.wait()
    # A hung engine: reported without stacks, with what to grant, said once.
    _, url = engine
    prober = TargetProber(url, engine="vllm", timeout=5, canary_interval=0)
    prober.run_once()
    watcher = EngineProcessWatcher([prober])
    watcher.refresh()
    dumper = HangDumper([prober], watcher, py_spy=str(as_nobody), clock=_later(1000))
    for _ in range(2):
        dumper._last_dump.clear()
        for thread in dumper.check():
            thread.join(60)
    assert dumper.counts()[(url, "vllm", "unavailable")] == 2
    reports = _reports(logs)
    assert [r["result"] for r in reports] == ["unavailable", "unavailable"]
    assert "permission" in reports[0]["processes"][0]["error"].lower()
    (warning,) = [line for line in logs if "SYS_PTRACE" in line["message"]]
    assert warning["level"] == "WARNING" and "pid: host" in warning["message"]


@needs_py_spy
def test_a_hung_local_engine_is_reported_with_the_stacks_of_its_processes(engine, logs):
    process, url = engine
    prober = TargetProber(url, engine="vllm", timeout=5, canary_interval=0)
    prober.run_once()
    watcher = EngineProcessWatcher([prober])
    (view,) = watcher.refresh()
    assert view.listener == process.pid
    # Pending work and no progress: as seen 1000 s on, past the threshold.
    dumper = HangDumper([prober], watcher, after=120, interval=600, py_spy=PY_SPY)
    assert dumper.check() == []  # just read: not hung yet
    dumper.clock = _later(1000)
    (thread,) = dumper.check()
    thread.join(60)
    assert dumper.check() == []  # one report per interval
    assert dumper.counts() == {
        (url, "vllm", "ok"): 1,
        (url, "vllm", "failed"): 0,
        (url, "vllm", "unavailable"): 0,
    }
    (report,) = _reports(logs)
    assert report["level"] == "ERROR"
    assert (report["target"], report["engine"], report["model"]) == (url, "vllm", LLAMA)
    assert report["stalled_for_s"] >= 999 and report["result"] == "ok"
    assert (report["requests_running"], report["requests_waiting"]) == (5.0, 1.0)
    assert "5 running, 1 waiting" in report["message"]
    (entry,) = report["processes"]
    assert entry["pid"] == process.pid and entry["role"] == "listener"
    assert entry["comm"].startswith("python") and entry["state"] == "sleeping"
    assert "serve_forever (socketserver.py:" in entry["stack"], entry["stack"]
    # Idle: nothing pending, nothing reported however long since the last progress.
    _serve(process, IDLE.sub(r"\1 0.0", vllm()))
    prober.run_once()
    assert not any(m.pending for m in prober.state().engine_state.models)
    idle = HangDumper([prober], watcher, after=1, py_spy=PY_SPY, clock=_later(5000))
    assert idle.check() == []


IDLE = re.compile(r"^(vllm:num_requests_(?:running|waiting)\{[^}]*\}) \S+$", re.MULTILINE)


def _serve(process: subprocess.Popen, text: str) -> None:
    """Replace the metrics file the engine process serves (the directory after -d)."""
    directory = Path(process.args[process.args.index("-d") + 1])
    (directory / "metrics").write_text(text)


@needs_py_spy
def test_without_py_spy_or_on_another_host_the_report_has_no_stacks(engine, logs):
    _, url = engine
    prober = TargetProber(url, engine="vllm", timeout=5, canary_interval=0)
    prober.run_once()
    watcher = EngineProcessWatcher([prober])
    watcher.refresh()
    missing = HangDumper([prober], watcher, py_spy="/nonexistent/py-spy", clock=_later(1000))
    for thread in missing.check():
        thread.join(60)
    missing._last_dump.clear()  # a second hang: the warning is not repeated
    for thread in missing.check():
        thread.join(60)
    assert missing.counts()[(url, "vllm", "unavailable")] == 2
    warnings = [line for line in logs if line["level"] == "WARNING"]
    assert [w["message"] for w in warnings if "py-spy not found" in w["message"]] == [
        "py-spy not found (--py-spy /nonexistent/py-spy): hang reports come without Python "
        "stacks; install it (pip install py-spy) or name it with --py-spy PATH"
    ]
    reports = _reports(logs)
    assert len(reports) == 2 and all(r["processes"] == [] for r in reports)
    assert all(r["result"] == "unavailable" for r in reports)
    assert reports[0]["message"].endswith("py-spy not found (--py-spy /nonexistent/py-spy)")

    remote = EngineProcessWatcher([prober], local=lambda host: False)  # as if on another host
    remote.refresh()
    elsewhere = HangDumper([prober], remote, py_spy=PY_SPY, clock=_later(1000))
    for thread in elsewhere.check():
        thread.join(60)
    assert elsewhere.counts()[(url, "vllm", "unavailable")] == 1
    assert _reports(logs)[-1]["message"].endswith("the target is not on this host")


@needs_py_spy
def test_an_engine_that_is_not_python_gives_a_failed_report(logs):
    """A listener py-spy cannot read (Perl here, like TGI's Rust router): failed, with why."""
    listener = subprocess.Popen(
        [
            "perl",
            "-MIO::Socket::INET",
            "-e",
            '$s = IO::Socket::INET->new(LocalAddr => "127.0.0.1", LocalPort => 0, Listen => 5)'
            ' or die; $| = 1; print $s->sockport, "\\n"; sleep 600',
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{int(listener.stdout.readline())}"
        prober = TargetProber(url, engine="tgi", timeout=1, canary_interval=0)
        watcher = EngineProcessWatcher([prober])
        (view,) = watcher.refresh()
        assert view.listener == listener.pid
        dumper = HangDumper([prober], watcher, py_spy=PY_SPY)
        result, processes = dumper.report(Hang(url, "tgi", "bigcode/starcoder", 300.0, 4.0, 0.0))
        assert result == "failed"
        assert processes[0]["pid"] == listener.pid and "python version" in processes[0]["error"]
        assert dumper.counts() == {(url, "tgi", "failed"): 1}
        assert _reports(logs)[-1]["message"].endswith("py-spy read no stack")
    finally:
        listener.kill()
        listener.wait()


def _open_request(base_url: str, body: dict) -> socket.socket:
    """A streaming completion sent on a raw socket and left open (its answer is not read)."""
    host, port = base_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    payload = json.dumps({**body, "stream": True}).encode()
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload
    )
    return sock


@needs_py_spy
def test_a_frozen_engine_keeps_its_pending_work_published_and_is_reported_with_its_stacks(
    tmp_path, demo_dir
):
    (tmp_path / "engine").mkdir()
    # One request at a time: the others wait, so there is work pending for a while.
    server = start_server(tmp_path / "engine", demo_dir, "--max-batch-size", "1")
    exporter = start_exporter(
        tmp_path,
        tmp_path / "exporter-state",  # not the server's: it is watched as a foreign engine
        "--target",
        f"vigil={server.base_url}",
        "--gpu-backend",
        "none",
        "--probe-interval",
        "0.5",
        "--probe-timeout",
        "1",
        "--canary-interval",
        "0",
        "--hang-dumps",
        "--hang-dump-after",
        "3",
    )
    pid = server.process.pid
    labels = {"target": server.base_url, "engine": "vigil", "model": "demo"}
    sockets = []
    try:
        for i in range(4):
            body = {"model": "demo", "prompt": f"long {i}", "max_tokens": 1900, "ignore_eos": True}
            sockets.append(_open_request(server.base_url, body))

        def sample(name: str, **extra: str) -> float | None:
            try:
                return exporter.sample(name, **{**labels, **extra})
            except KeyError:
                return None

        def working() -> bool:
            waiting = sample("vigil_engine_requests_waiting") or 0
            running = sample("vigil_engine_requests_running") or 0
            return (
                running >= 1 and waiting >= 1 and (sample("vigil_engine_progress_total") or 0) > 0
            )

        exporter.wait_for(working, 60, "the engine running and queueing requests, and moving")
        server.process.send_signal(signal.SIGSTOP)
        engine = {"target": server.base_url, "engine": "vigil"}
        exporter.wait_for(
            lambda: exporter.sample("vigil_engine_metrics_up", **engine) == 0.0,
            30,
            "the engine's /metrics to stop answering",
        )
        frozen_progress = sample("vigil_engine_progress_total")

        def reports() -> list[dict]:
            return [
                line for line in exporter.logs() if line["message"].startswith("engine hang report")
            ]

        exporter.wait_for(lambda: reports(), 60, "the engine hang report")
        (report,) = reports()
        # The exporter still publishes the pending work, and no progress.
        assert sample("vigil_engine_requests_running") >= 1
        assert sample("vigil_engine_requests_waiting") >= 1
        assert sample("vigil_engine_progress_total") == frozen_progress
        assert exporter.sample("vigil_engine_metrics_up", **engine) == 0.0
        exporter.wait_for(  # counted once its line is written
            lambda: exporter.sample("vigil_engine_hang_dumps_total", result="ok", **engine) == 1,
            10,
            "the hang report counted",
        )
        assert report["level"] == "ERROR" and report["result"] == "ok"
        assert (report["target"], report["engine"], report["model"]) == (
            server.base_url,
            "vigil",
            "demo",
        )
        assert report["stalled_for_s"] >= 3
        assert report["requests_running"] >= 1 and report["requests_waiting"] >= 1
        (process,) = [p for p in report["processes"] if p["pid"] == pid]
        assert process["role"] == "listener" and process["state"] == "stopped"
        # Our engine's own loop is in the stack: a frame of the inference package.
        assert re.search(r"\(inference/engine/[a-z_]+\.py:\d+\)", process["stack"]), process[
            "stack"
        ]
    finally:
        server.process.send_signal(signal.SIGCONT)
        for sock in sockets:
            sock.close()
        exporter.stop()
        server.stop()
