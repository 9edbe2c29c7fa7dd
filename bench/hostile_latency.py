"""Hostile traffic: /health latency while the server reads huge bodies or holds slow sockets.

What it measures
    The client-side latency of ``GET /health`` (one keep-alive ``requests`` session, one probe
    at a time) against the real server (``python -m inference`` as a subprocess on the demo
    model), in these conditions of the same run:

    idle      nothing else is sent.
    messages  a chat request of 219,444 tiny messages (7.5 MB of JSON) is in the server.
    arrays    a chat request with an ignored field of 10 Mi nested empty arrays (30 MiB).
    object    a chat request with an ignored object of 2.5 M members (30 MiB).
              With the default limits all three are refused from a count of their JSON values
              (commas, '[' and '{') before they are parsed; json.loads would build the arrays
              and the object in C holding the GIL for seconds, even in a worker thread.
    validated the 219,444 messages again, on a server with ``--max-messages-per-request
              1000000``: parsed and validated whole (pydantic) in a worker thread.
    slow      ``--silent`` connections that send nothing and ``--slow`` that send a request
              head one byte every 0.5 s are open (opened before the probes; closed by the
              server after ``--header-timeout``, 10 s by default). Their number, with the
              probe's own connection, stays under the server's cap (1,000), so that none is
              closed to make room: this measures a server holding that many slow sockets, not
              its evictions.

    A body is sent on a socket of its own and counts as in the server from the moment the
    server has read all of it (its socket's queues on both sides empty, from /proc/net/tcp)
    until its answer arrives: probes during the upload (the loop reading the body, which is
    not what is measured here) are not taken. A probe counts when it starts in that window.

    Goal: /health stays under 100 ms while a body is in the server (issue 16 item 3). Printed:
    each condition's median, 99th percentile and largest latency, their ratios to the idle
    median of the same run, and the server's open file descriptors (/proc/PID/fd) before the
    slow sockets, while they are open, and once the header timeout has closed them.

How
    ``--rounds`` rounds, each an idle phase then one phase per body of ``--probes`` probes, so
    that the machine's drift hits all alike; then the slow phase once. Nothing asserts on
    time; the exit status is 0 whether or not the goal is met (non-zero only if the server
    fails).

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

from vigil.netproc import tcp_queues  # noqa: E402

GOAL_MS = 100.0
MESSAGES = 219_444


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="idle+body rounds (default: 5)")
    parser.add_argument(
        "--probes", type=int, default=40, help="/health probes per phase and round (default: 40)"
    )
    parser.add_argument(
        "--silent", type=int, default=900, help="connections that send nothing (default: 900)"
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


def _send_body(port: int, body: bytes, in_server: threading.Event) -> bytes:
    """POST the body on a socket of its own; ``in_server`` is set from the moment the server
    has read all of it until its answer arrives. The answer's status line."""
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        ours, theirs = sock.getsockname(), sock.getpeername()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            mine, server = tcp_queues(ours, theirs), tcp_queues(theirs, ours)
            if mine is not None and mine[0] == 0 and (server is None or server[1] == 0):
                break
            time.sleep(0.001)
        in_server.set()
        try:
            reply = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    return reply.split(b"\r\n", 1)[0]
                reply += chunk
        finally:
            in_server.clear()


def _body_phase(session, url: str, port: int, body: bytes, probes: int) -> list[float]:
    """Probe /health while the big body is in the server (sent again once it is answered)."""
    latencies: list[float] = []
    in_server = threading.Event()
    done = threading.Event()
    failure: list[str] = []

    def send_bodies() -> None:
        while not done.is_set():
            status = _send_body(port, body, in_server)
            if not status.startswith(b"HTTP/1.1 400"):
                failure.append(f"the big body got {status!r}")
                return

    sender = threading.Thread(target=send_bodies, daemon=True)
    sender.start()
    try:
        while len(latencies) < probes:
            if failure:
                raise RuntimeError(failure[0])
            if not in_server.wait(60):
                raise RuntimeError("the big body was never read")
            started_in_server = in_server.is_set()
            latency = _probe(session, url)
            if started_in_server:
                latencies.append(latency)
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


def _rounds(args, session, server, bodies: dict[str, bytes]) -> dict[str, list[float]]:
    """``--rounds`` rounds of an idle phase then a phase per body; their latencies."""
    meter = CpuMeter(lambda: [server.process.pid])
    phases: dict[str, list[float]] = {"idle": [], **{label: [] for label in bodies}}
    for _ in range(5):  # warm-up
        _probe(session, server.url)
    for round_index in range(args.rounds):
        mark = meter.mark()
        idle = [_probe(session, server.url) for _ in range(args.probes)]
        phases["idle"] += idle
        line = f"  round {round_index + 1}: idle median {statistics.median(idle) * 1e3:6.2f} ms"
        for label, body in bodies.items():
            busy = _body_phase(session, server.url, server.port, body, args.probes)
            phases[label] += busy
            line += f"; {label} median {statistics.median(busy) * 1e3:.2f} largest "
            line += f"{max(busy) * 1e3:.2f} ms"
        print(f"{line}; other load {meter.foreign_cores(mark):.2f} cores")
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


def _bodies() -> dict[str, bytes]:
    head = b'{"model":"demo","messages":[{"role":"user","content":"hi"}],"x":'
    return {
        "messages": json.dumps(
            {"model": "demo", "messages": [{"role": "user", "content": "x"}] * MESSAGES}
        ).encode(),
        "arrays": head + b"[" + b"[]," * (10 * 1024 * 1024) + b"[]]}",
        "object": head + b"{" + b",".join(b'"k%d":0' % i for i in range(2_500_000)) + b"}}",
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    import requests

    workdir = Path(tempfile.mkdtemp(prefix="vigil-bench-hostile-"))
    bodies = _bodies()
    sizes = ", ".join(f"{label} {len(body) / 1e6:.1f} MB" for label, body in bodies.items())
    print(
        f"hostile_latency: /health latency, {args.rounds} rounds of {args.probes} probes idle "
        f"and while each body is in the server ({sizes}); then {args.silent} silent and "
        f"{args.slow} slow connections; {os.cpu_count()} CPUs"
    )
    extra = list(args.server_arg)
    server = None
    status = 0
    try:
        # (1) The server as configured: each body refused from its count of JSON values.
        server = start_server(args, workdir)
        print(f"  server: {' '.join(server.command[1:])}")
        with requests.Session() as session:
            phases = _rounds(args, session, server, bodies)
            phases["slow"], (before, during, after) = _slow_phase(args, session, server)
        server.stop()
        _report(phases)
        largest_body = max(max(phases[label]) for label in bodies) * 1e3
        print(
            f"  server descriptors: {before} before the slow sockets, {during} with them open, "
            f"{after} after the header timeout"
        )
        # (2) The limit raised: every message validated (pydantic), in a worker thread.
        args.server_arg = ["--max-messages-per-request", "1000000", *extra]
        server = start_server(args, workdir)
        print(f"  server: {' '.join(server.command[1:])}")
        with requests.Session() as session:
            whole = _rounds(args, session, server, {"validated": bodies["messages"]})
        _report(whole)
        print(
            f"  goal: /health under {GOAL_MS:g} ms while a body is in the server: largest "
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
