"""What must not fool the exporter: a /proc read that fails once, a pid reused by a restarted
container, a server that drips its answer, a malformed event stream."""

from __future__ import annotations

import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from exporter.inference_dir import InferenceDirectory
from exporter.probe import TargetProber
from exporter.procview import ProcStat, ProcUnreadable

ALIVE = ProcStat(
    pid=7, state="sleeping", cpu_seconds=1.0, threads=4, start_ticks=100, resident_bytes=1 << 20
)


class ScriptedLocator:
    """Answers locate() from a script of results: a ProcStat, None (gone) or an exception."""

    def __init__(self, *answers):
        self.answers = list(answers)

    def locate(self, identity):
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


def _state_dir(tmp_path: Path, pid: int = 7, ticks: int = 100) -> Path:
    (tmp_path / "processes").mkdir(parents=True, exist_ok=True)
    (tmp_path / "metrics").mkdir(exist_ok=True)
    (tmp_path / "processes" / f"{pid}.json").write_text(
        json.dumps({"pid": pid, "proc_start_ticks": ticks, "model": "glm"})
    )
    (tmp_path / "metrics" / f"gauge_liveall_{pid}.db").write_bytes(b"\0" * 16)
    return tmp_path


def test_an_unreadable_or_once_missing_process_is_not_buried(tmp_path):
    state = _state_dir(tmp_path)
    directory = InferenceDirectory(
        state, locator=ScriptedLocator(ALIVE, ProcUnreadable("EMFILE"), None, ALIVE)
    )
    for _ in range(4):
        views = directory.refresh()
        assert [v.stat is not None for v in views] == [True]
    assert directory.unclean_exits() == {"glm": 0}
    assert (state / "metrics" / "gauge_liveall_7.db").exists()


def test_a_dead_process_is_counted_once_and_its_gauges_go(tmp_path):
    state = _state_dir(tmp_path)
    os.utime(state / "metrics" / "gauge_liveall_7.db", (time.time() - 5, time.time() - 5))
    directory = InferenceDirectory(state, locator=ScriptedLocator(ALIVE, None))
    directory.refresh()
    for _ in range(3):
        views = directory.refresh()
    assert [v.stat for v in views] == [None]
    assert directory.unclean_exits() == {"glm": 1}
    assert not (state / "metrics" / "gauge_liveall_7.db").exists()


def test_a_restarted_container_reusing_the_pid_keeps_its_new_gauges(tmp_path):
    """The old pid 1 died; the new pid 1 created its gauge file but not yet its identity."""
    state = _state_dir(tmp_path, pid=1, ticks=100)
    directory = InferenceDirectory(state, retention=0.0, locator=ScriptedLocator(ALIVE, None))
    directory.refresh()
    directory.refresh()
    directory.refresh()  # dead now; its old gauge file was removed
    time.sleep(0.05)
    new_gauges = state / "metrics" / "gauge_liveall_1.db"
    new_gauges.write_bytes(b"\0" * 16)  # the new process, after the death was seen
    (state / "processes" / "1.json").write_text(
        json.dumps({"pid": 1, "proc_start_ticks": 999, "model": "glm"})
    )  # and now its identity
    directory.refresh()
    assert new_gauges.exists()
    assert json.loads((state / "processes" / "1.json").read_text())["proc_start_ticks"] == 999


class _Scripted(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):  # noqa: N802 - drip the answer a byte at a time
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        for _ in range(1000):
            try:
                self.wfile.write(b"x")
                self.wfile.flush()
            except OSError:
                return
            time.sleep(0.05)

    def do_POST(self):  # noqa: N802 - a malformed event stream
        body = b"data: null\n\ndata: [DONE]\n\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_probe_gives_up_on_a_dripping_server_and_rejects_a_malformed_stream():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        prober = TargetProber(
            f"http://127.0.0.1:{server.server_port}", timeout=0.5, canary_model="m"
        )
        done = threading.Event()
        threading.Thread(target=lambda: (prober.run_once(), done.set()), daemon=True).start()
        assert done.wait(30), "the probe hung on a server that drips its answer"
        results = prober.state().results
        assert not results["health"].success and "longer than 0.5 s" in results["health"].error
        assert not results["canary"].success and "malformed" in results["canary"].error
    finally:
        server.shutdown()
