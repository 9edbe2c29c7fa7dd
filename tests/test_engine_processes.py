"""The exporter's view of a foreign engine's processes, on literal /proc trees: found from the
target's port with its children, read again between discoveries, a replaced listener counted as
a restart, and a target on another host left alone."""

from __future__ import annotations

import shutil
from pathlib import Path

from test_netproc import add_process, tcp_line, write_tables

from exporter.engine_processes import EngineProcessWatcher, is_local
from exporter.probe import TargetProber

LISTEN_8000 = tcp_line(0, "0100007F:1F40", "00000000:0000", "0A", 9001)


def _engine(proc: Path, pid: int) -> None:
    """A vLLM-like tree: the API server (holds the socket) and its EngineCore child."""
    write_tables(proc, [LISTEN_8000])
    add_process(proc, pid, 1, sockets=(9001,), comm="vllm", kids={pid: [pid + 1]})
    add_process(proc, pid + 1, pid, comm="VLLM::EngineCor", kids={pid + 1: []})


def _watcher(proc: Path, *urls: str) -> EngineProcessWatcher:
    probers = [TargetProber(url, engine="vllm") for url in urls]
    return EngineProcessWatcher(
        probers, discover_interval=3600, proc=proc, local=lambda host: host == "127.0.0.1"
    )


def test_the_engine_is_found_kept_and_a_replaced_listener_is_a_restart(tmp_path: Path):
    proc = tmp_path / "proc"
    _engine(proc, 100)
    watcher = _watcher(proc, "http://127.0.0.1:8000", "http://10.9.9.9:8000")
    (view,) = watcher.refresh()  # the remote target has no processes here
    assert view.target == "http://127.0.0.1:8000" and view.engine == "vllm"
    assert view.listener == 100 and [s.pid for s in view.processes] == [100, 101]
    assert [s.comm for s in view.processes] == ["vllm", "VLLM::EngineCor"]
    assert view.restarts == 0 and view.problem is None
    # The child exits: between discoveries only the known processes are read again.
    shutil.rmtree(proc / "101")
    (view,) = watcher.refresh()
    assert [s.pid for s in view.processes] == [100] and view.restarts == 0
    # The listener is replaced by a new server (another pid): found again, and a restart.
    shutil.rmtree(proc / "100")
    _engine(proc, 200)
    (view,) = watcher.refresh()
    assert view.listener == 200 and [s.pid for s in view.processes] == [200, 201]
    assert view.restarts == 1
    # The engine is gone: no processes, and the reason.
    shutil.rmtree(proc / "200")
    shutil.rmtree(proc / "201")
    write_tables(proc, [])
    (view,) = watcher.refresh()
    assert view.processes == () and view.listener is None and view.restarts == 1
    assert "nothing listens" in (view.problem or "")


def test_local_addresses_are_told_from_others():
    assert is_local("127.0.0.1") and is_local("localhost")
    assert not is_local("192.0.2.1")  # TEST-NET-1: never an address of this machine
    assert not is_local("no-such-host.invalid")


def test_an_engine_not_found_is_looked_for_again_only_after_the_interval(tmp_path, monkeypatch):
    """Nothing listens yet (an engine still loading): one scan of every process's descriptors
    per discovery interval, not one a second."""
    from exporter import engine_processes

    proc = tmp_path / "proc"
    write_tables(proc, [])
    scans = []
    real = engine_processes.find_engine_processes
    monkeypatch.setattr(
        engine_processes,
        "find_engine_processes",
        lambda *args, **kwargs: scans.append(1) or real(*args, **kwargs),
    )
    watcher = _watcher(proc, "http://127.0.0.1:8000")
    for _ in range(10):
        (view,) = watcher.refresh()
    assert len(scans) == 1 and view.listener is None and "nothing listens" in view.problem
