"""How fast a hang is noticed: from the start of an injected hang to the stall report and to the
client's error, against the configured stall timeout.

For each stall timeout T (``--timeouts``), a server runs with ``--enable-fault-injection
--on-stall report --stall-timeout T``; each round arms a hang in the decode stage for T + 3 s,
sends one completion, and reads three instants on one clock (wall time, as the server's JSON
log lines and the client both give it):
- the hang's start: the server's "injected fault hang fires" log line;
- the stall report: the "stall report" log line;
- the client's error: when the 503 reached the client.
It then waits for the engine to move again before the next round. One more round per timeout
runs with ``--on-stall exit`` and adds the moment the process exited.

``default`` in ``--timeouts`` runs the shipped options instead (no ``--stall-timeout``: the
threshold follows the step, max(--stall-floor 5 s, --stall-factor 10 x predicted), bounded by
30 s): the server is first warmed up with a few completions so that the decode step has a
prediction (milliseconds on the CPU), and the hang is reported past the 5 s floor.

The figures are latencies beyond the threshold (the watchdog checks every min(1, T/20) s, T the
smaller of the timeout and the floor, and the engine's last step before the hang counts as
progress), printed as medians and maxima.
Run: ``.venv/bin/python bench/stall_detection.py`` (about 3 minutes on the CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import requests

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serving_efficiency import Server, free_port  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--timeouts",
        default="1,2,5,default",
        help="comma-separated stall timeouts in seconds, or default for the shipped options "
        "(default 1,2,5,default)",
    )
    parser.add_argument("--rounds", type=int, default=5, help="hangs per timeout (default 5)")
    parser.add_argument(
        "--demo-dir",
        default=os.environ.get("VIGIL_TEST_DEMO_DIR") or str(Path.home() / ".cache" / "llm-vigil"),
    )
    return parser.parse_args(argv)


def _log_time(server: Server, prefix: str, after: float) -> float | None:
    """Wall time of the first log line starting with ``prefix`` logged after ``after``."""
    for raw in server.log_path.read_text(errors="replace").splitlines():
        if not raw.startswith("{"):
            continue
        line = json.loads(raw)
        if line["message"].startswith(prefix):
            at = datetime.fromisoformat(line["timestamp"]).timestamp()
            if at >= after:
                return at
    return None


def _wait(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise RuntimeError("timed out")


DEFAULT_FLOOR_S = 5.0  # --stall-floor's default: the threshold of a hung millisecond step


def _warm_up(server: Server) -> None:
    """Steps enough for a decode prediction (the first two of a stage are not learned)."""
    for _ in range(4):
        requests.post(
            server.url + "/v1/completions",
            timeout=120,
            json={"model": "demo", "prompt": "warm up", "max_tokens": 8},
        ).raise_for_status()


def _stall_options(timeout_s: float | None) -> list[str]:
    return [] if timeout_s is None else ["--stall-timeout", str(timeout_s)]


def one_hang(server: Server, timeout_s: float) -> dict[str, float]:
    started = time.time()
    armed = requests.post(
        server.url + "/debug/fault",
        timeout=10,
        json={"fault": "hang", "stage": "decode", "seconds": timeout_s + 3},
    )
    armed.raise_for_status()
    response = requests.post(
        server.url + "/v1/completions",
        timeout=120,
        json={"model": "demo", "prompt": "hang here", "max_tokens": 50, "ignore_eos": True},
    )
    answered = time.time()
    if response.status_code != 503 or response.json()["error"]["code"] != "engine_stalled":
        raise RuntimeError(f"expected a stall error, got {response.status_code} {response.text}")
    _wait(lambda: _log_time(server, "stall report", started) is not None, 10)
    hang = _log_time(server, "injected fault hang fires", started)
    report = _log_time(server, "stall report", started)
    return {"report": report - hang, "client": answered - hang}


def run_timeout(args, workdir: Path, timeout_s: float | None) -> dict[str, list[float]]:
    """The rounds for one stall timeout (None: the shipped options, threshold the floor)."""
    threshold = DEFAULT_FLOOR_S if timeout_s is None else timeout_s
    figures: dict[str, list[float]] = {"report": [], "client": [], "exit": []}
    server = Server(
        args.demo_dir,
        workdir,
        free_port(),
        ["--enable-fault-injection", "--on-stall", "report", *_stall_options(timeout_s)],
    )
    try:
        server.wait_ready(120)
        if timeout_s is None:
            _warm_up(server)
        for _ in range(args.rounds):
            result = one_hang(server, threshold)
            for key, value in result.items():
                figures[key].append(value)
            _wait(
                lambda: requests.get(server.url + "/health", timeout=5).status_code == 200,
                threshold + 30,
            )
    finally:
        server.stop()
    server = Server(
        args.demo_dir,
        workdir,
        free_port(),
        ["--enable-fault-injection", *_stall_options(timeout_s)],
    )
    try:
        server.wait_ready(120)
        if timeout_s is None:
            _warm_up(server)
        started = time.time()
        result = one_hang(server, threshold)
        server.process.wait(timeout=threshold + 30)
        exited = time.time()
        hang = _log_time(server, "injected fault hang fires", started)
        figures["report"].append(result["report"])
        figures["client"].append(result["client"])
        figures["exit"].append(exited - hang)
        if server.process.returncode != 75:
            raise RuntimeError(f"exit status {server.process.returncode}, expected 75")
    finally:
        server.stop()
    return figures


def main(argv=None) -> int:
    args = parse_args(argv)
    timeouts = [None if t == "default" else float(t) for t in args.timeouts.split(",")]
    print(
        f"stall detection: {args.rounds} hangs per timeout with --on-stall report, one with "
        "exit; seconds from the hang's start"
    )
    print(
        f"{'timeout':>8} {'report median':>14} {'report max':>11} {'client median':>14} "
        f"{'client max':>11} {'exit':>6}   report beyond the timeout (median)"
    )
    with tempfile.TemporaryDirectory(prefix="vigil-stall-bench-") as tmp:
        for timeout_s in timeouts:
            name = "default" if timeout_s is None else f"{timeout_s:g}s"
            threshold = DEFAULT_FLOOR_S if timeout_s is None else timeout_s
            workdir = Path(tmp) / f"t{name}"
            workdir.mkdir()
            f = run_timeout(args, workdir, timeout_s)
            report, client = statistics.median(f["report"]), statistics.median(f["client"])
            print(
                f"{name:>8} {report:>13.2f}s {max(f['report']):>10.2f}s "
                f"{client:>13.2f}s {max(f['client']):>10.2f}s {f['exit'][0]:>5.2f}s   "
                f"+{report - threshold:.2f}s ({report / threshold:.2f}x)"
                + (f" of the {threshold:g} s floor" if timeout_s is None else "")
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
