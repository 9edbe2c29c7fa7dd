"""Hostile traffic: /health latency while the server reads a huge body or holds slow sockets.

What it measures
    The client-side latency of ``GET /health`` (one keep-alive ``requests`` session, one probe
    at a time) against the real server (``python -m inference`` as a subprocess on the demo
    model), in three conditions of the same run:

    idle   nothing else is sent.
    body   a chat request of 219,444 tiny messages (7.5 MB of JSON, under the body limit) is in
           flight, sent again as soon as it is answered: the server reads the JSON and validates
           it (pydantic) before refusing it (more messages than the context has tokens). The
           server runs with ``--max-messages-per-request 1000000``, so that the whole body is
           validated: with the default (4,096) it is refused as soon as it is read.
    slow   ``--silent`` connections that send nothing and ``--slow`` that send a request head
           one byte every 0.5 s are open (opened before the probes; they are closed by the
           server after ``--header-timeout``, 10 s by default, so the phase lasts less).

    Goal: /health stays under 100 ms while the body is read (issue 16 item 3: it was held for
    1.5 s when the body was read on the event loop). Printed: each condition's median, 99th
    percentile and largest latency, their ratios to the idle median of the same run, and the
    server's open file descriptors (/proc/PID/fd) before the slow sockets, while they are open,
    and once the header timeout has closed them.

How
    ``--rounds`` rounds, each an idle phase then a body phase of ``--probes`` probes, so that
    the machine's drift hits both alike; then the slow phase once. The body requests come
    from a thread of this process; the probes count only while a body request is in flight.
    Nothing asserts on time; the exit status is 0 whether or not the goal is met (non-zero
    only if the server fails).

Run from the repository root:
    .venv/bin/python bench/hostile_latency.py [--rounds 5 --probes 40 ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _benchutil, serving_efficiency

from _benchutil import CpuMeter  # noqa: E402
from serving_efficiency import add_server_options, check_server_options, start_server  # noqa: E402

GOAL_MS = 100.0
MESSAGES = 219_444


def parse_args(argv=None) -> argparse.Namespace:
    from inference.config import Config

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--demo-dir",
        default=Config().demo_dir,
        help="where the demo model is built/cached (default: %(default)s)",
    )
    parser.add_argument("--rounds", type=int, default=5, help="idle+body rounds (default: 5)")
    parser.add_argument(
        "--probes", type=int, default=40, help="/health probes per phase and round (default: 40)"
    )
    parser.add_argument(
        "--silent", type=int, default=1000, help="connections that send nothing (default: 1000)"
    )
    parser.add_argument(
        "--slow", type=int, default=50, help="connections that trickle a head (default: 50)"
    )
    add_server_options(parser)
    args = parser.parse_args(argv)
    check_server_options(parser, args)
    return args


def _probe(session, url: str) -> float:
    started = time.perf_counter()
    response = session.get(url + "/health", timeout=60)
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    return elapsed


def _figures(values: list[float]) -> tuple[float, float, float]:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return statistics.median(ordered), p99, ordered[-1]


def _descriptors(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def _body_phase(session, url: str, body: bytes, probes: int) -> list[float]:
    """Probe /health while the big body is in flight (sent again as soon as it is answered)."""
    import requests

    latencies: list[float] = []
    in_flight = threading.Event()
    done = threading.Event()

    def send_bodies() -> None:
        with requests.Session() as sender:
            while not done.is_set():
                in_flight.set()
                answer = sender.post(url + "/v1/chat/completions", data=body, timeout=120)
                in_flight.clear()
                if answer.status_code != 400:
                    raise RuntimeError(f"the big body got {answer.status_code}: {answer.text}")

    sender = threading.Thread(target=send_bodies, daemon=True)
    sender.start()
    try:
        while len(latencies) < probes:
            if not in_flight.wait(60):
                raise RuntimeError("the big body was never sent")
            time.sleep(0.02)  # the upload (loopback) is under way or done
            if in_flight.is_set():
                latencies.append(_probe(session, url))
    finally:
        done.set()
        sender.join(120)
    return latencies


def _open_slow_sockets(port: int, silent: int, slow: int) -> tuple[list[socket.socket], ...]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = silent + slow + 256
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    quiet = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(silent)]
    trickling = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(slow)]
    return quiet, trickling


def _rounds(args, session, server, body: bytes, label: str) -> dict[str, list[float]]:
    """``--rounds`` rounds of an idle phase then a body phase; their latencies."""
    meter = CpuMeter(lambda: [server.process.pid])
    phases: dict[str, list[float]] = {"idle": [], label: []}
    for _ in range(5):  # warm-up
        _probe(session, server.url)
    for round_index in range(args.rounds):
        mark = meter.mark()
        idle = [_probe(session, server.url) for _ in range(args.probes)]
        busy = _body_phase(session, server.url, body, args.probes)
        phases["idle"] += idle
        phases[label] += busy
        print(
            f"  round {round_index + 1}: idle median {statistics.median(idle) * 1e3:6.2f} ms, "
            f"{label} median {statistics.median(busy) * 1e3:6.2f} ms, largest "
            f"{max(busy) * 1e3:7.2f} ms; other load {meter.foreign_cores(mark):.2f} cores"
        )
    return phases


def _slow_phase(args, session, server) -> tuple[list[float], tuple[int, int, int]]:
    """Probes while silent and trickling connections are open; the server's descriptors
    before, while they are open, and once the header timeout has closed them."""
    pid = server.process.pid
    before = _descriptors(pid)
    quiet, trickling = _open_slow_sockets(server.port, args.silent, args.slow)
    stop = threading.Event()

    def trickle() -> None:
        while not stop.wait(0.5):
            for sock in trickling:
                with contextlib.suppress(OSError):
                    sock.send(b"x")

    trickler = threading.Thread(target=trickle, daemon=True)
    trickler.start()
    try:
        time.sleep(0.5)
        during = _descriptors(pid)
        latencies = [_probe(session, server.url) for _ in range(args.probes)]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and _descriptors(pid) > before + 5:
            time.sleep(0.5)
        after = _descriptors(pid)
    finally:
        stop.set()
        trickler.join(5)
        for sock in quiet + trickling:
            sock.close()
    return latencies, (before, during, after)


def _report(phases: dict[str, list[float]]) -> None:
    base = statistics.median(phases["idle"])
    print("  condition  median ms   p99 ms   largest ms   median/idle  largest/idle")
    for name, values in phases.items():
        median, p99, largest = _figures(values)
        print(
            f"  {name:9s} {median * 1e3:9.2f} {p99 * 1e3:8.2f} {largest * 1e3:11.2f} "
            f"{median / base:12.2f} {largest / base:13.2f}"
        )


def main(argv=None) -> int:
    args = parse_args(argv)
    import requests

    workdir = Path(tempfile.mkdtemp(prefix="vigil-bench-hostile-"))
    body = json.dumps(
        {"model": "demo", "messages": [{"role": "user", "content": "x"}] * MESSAGES}
    ).encode()
    print(
        f"hostile_latency: /health latency, {args.rounds} rounds of {args.probes} probes idle "
        f"and while a body of {MESSAGES} messages ({len(body) / 1e6:.1f} MB) is read; then "
        f"{args.silent} silent and {args.slow} slow connections; {os.cpu_count()} CPUs"
    )
    extra = list(args.server_arg)
    server = None
    status = 0
    try:
        # (1) The server as configured: the body is refused once read (--max-messages-per-request).
        server = start_server(args, workdir)
        print(f"  server: {' '.join(server.command[1:])}")
        with requests.Session() as session:
            phases = _rounds(args, session, server, body, "body")
            phases["slow"], (before, during, after) = _slow_phase(args, session, server)
        server.stop()
        _report(phases)
        largest_body = max(phases["body"]) * 1e3
        print(
            f"  server descriptors: {before} before the slow sockets, {during} with them open, "
            f"{after} after the header timeout"
        )
        # (2) The limit raised: every message validated (pydantic), in a worker thread.
        args.server_arg = ["--max-messages-per-request", "1000000", *extra]
        server = start_server(args, workdir)
        print(f"  server: {' '.join(server.command[1:])}")
        with requests.Session() as session:
            whole = _rounds(args, session, server, body, "validated")
        _report(whole)
        print(
            f"  goal: /health under {GOAL_MS:g} ms while the body is read: largest "
            f"{largest_body:.1f} ms ({'met' if largest_body < GOAL_MS else 'NOT met'}); with "
            f"every message validated, largest {max(whole['validated']) * 1e3:.1f} ms"
        )
    except Exception as exc:  # noqa: BLE001 - say what failed, with the server's last lines
        print(f"hostile_latency: FAILED: {exc}", file=sys.stderr)
        if server is not None:
            print(f"server log tail:\n{server.log_tail()}", file=sys.stderr)
        status = 1
    finally:
        if server is not None:
            server.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"  kept: {workdir}")
    return status


if __name__ == "__main__":
    sys.exit(main())
