"""The stack without Docker: every part that exists on this machine, with the same files as
compose, each logging into a file, stopped together on Ctrl-C.

    python -m vigil.stack [--model demo] [--device auto] [--run-dir DIR] [-- INFERENCE ARGS...]

Parts: the inference process (the embedded demo model unless --model says otherwise; left out,
with a line that says why, on a light install without the serve extra), the exporter (probing
the inference process), and Prometheus (alerts/prometheus.yml with alerts/*.rules.yml) and
Alertmanager (alerts/alertmanager.yml) when they are installed. The inference process is
restarted when it exits (the watchdog exits with 75 on a stall), as compose's restart policy
does. Ports are those of alerts/prometheus.yml: inference 8000, exporter 9400, Prometheus 9090,
Alertmanager 9093, all on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from . import extras

REPO = Path(__file__).resolve().parents[1]
ALERTS = REPO / "alerts"
RESTART_BACKOFF_S = (1, 2, 5, 10, 30)


@dataclass
class Part:
    name: str
    command: list[str]
    url: str
    log_path: Path
    restart: bool = False
    process: subprocess.Popen | None = None
    restarts: int = 0
    _log: IO[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        if self._log is None:
            self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            self.command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=REPO,
        )

    def stop(self, grace: float = 15.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None


def _binary(*names: str) -> str | None:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return None


def plan(args: argparse.Namespace, run_dir: Path) -> tuple[list[Part], list[str]]:
    """The parts to start, and a line for each part that is missing here."""
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    state = run_dir / "state"
    python = sys.executable
    parts = []
    missing = []
    lacking = extras.missing_serve_modules()
    if lacking:  # a light install: the exporter and the rest watch whatever serves on :8000
        missing.append(f"inference: needs {', '.join(lacking)} ({extras.SERVE_INSTALL})")
    else:
        parts.append(
            Part(
                "inference",
                [
                    python,
                    "-m",
                    "inference",
                    "--model",
                    args.model,
                    "--device",
                    args.device,
                    "--host",
                    "127.0.0.1",
                    "--port",
                    "8000",
                    "--state-dir",
                    str(state),
                    *args.inference_args,
                ],
                "http://127.0.0.1:8000/v1",
                logs / "inference.log",
                restart=True,
            )
        )
    parts += [
        Part(
            "exporter",
            [
                python,
                "-m",
                "exporter",
                "--host",
                "127.0.0.1",
                "--port",
                "9400",
                "--state-dir",
                str(state),
                "--target",
                "http://127.0.0.1:8000",
            ],
            "http://127.0.0.1:9400/metrics",
            logs / "exporter.log",
        ),
    ]
    prometheus = _binary("prometheus")
    if prometheus:
        parts.append(
            Part(
                "prometheus",
                [
                    prometheus,
                    f"--config.file={ALERTS / 'prometheus.yml'}",
                    f"--storage.tsdb.path={run_dir / 'prometheus'}",
                    "--web.listen-address=127.0.0.1:9090",
                ],
                "http://127.0.0.1:9090",
                logs / "prometheus.log",
            )
        )
    else:
        missing.append("prometheus: not installed (Debian: apt-get install prometheus)")
    alertmanager = _binary("prometheus-alertmanager", "alertmanager")
    if alertmanager:
        parts.append(
            Part(
                "alertmanager",
                [
                    alertmanager,
                    f"--config.file={ALERTS / 'alertmanager.yml'}",
                    f"--storage.path={run_dir / 'alertmanager'}",
                    "--web.listen-address=127.0.0.1:9093",
                    "--cluster.listen-address=",
                ],
                "http://127.0.0.1:9093",
                logs / "alertmanager.log",
            )
        )
    else:
        missing.append(
            "alertmanager: not installed (Debian: apt-get install prometheus-alertmanager)"
        )
    missing.append("grafana, loki, alloy, tempo: run with Docker (compose/) to have them")
    return parts, missing


def supervise(parts: list[Part], stop_after: float | None = None) -> int:
    """Restart what should be restarted; return when told to stop (or a part gave up)."""
    stopping = {"flag": False}

    def ask_stop(*_):
        stopping["flag"] = True

    signal.signal(signal.SIGINT, ask_stop)
    signal.signal(signal.SIGTERM, ask_stop)
    deadline = None if stop_after is None else time.monotonic() + stop_after
    due: dict[str, float] = {}
    while not stopping["flag"] and (deadline is None or time.monotonic() < deadline):
        for part in parts:
            code = part.process.poll() if part.process is not None else None
            if code is None:
                continue
            if not part.restart:
                print(f"{part.name} exited with status {code}; see {part.log_path}", flush=True)
                return 1
            if part.name not in due:
                delay = RESTART_BACKOFF_S[min(part.restarts, len(RESTART_BACKOFF_S) - 1)]
                reason = " (the watchdog found a stall)" if code == 75 else ""
                print(
                    f"{part.name} exited with status {code}{reason}; restarting in {delay} s",
                    flush=True,
                )
                due[part.name] = time.monotonic() + delay
            elif time.monotonic() >= due[part.name]:
                del due[part.name]
                part.restarts += 1
                part.start()
        time.sleep(0.5)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vigil.stack", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--model",
        default="demo",
        help="model for the inference process (default: the embedded demo model)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--run-dir",
        help="where state, data and logs go (default: a new directory under the system's temp)",
    )
    parser.add_argument("--stop-after", type=float, help=argparse.SUPPRESS)  # for the tests
    parser.add_argument(
        "inference_args", nargs="*", help="more arguments for the inference process (after --)"
    )
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="vigil-stack-")).resolve()
    parts, missing = plan(args, run_dir)
    for part in parts:
        part.start()
    print(f"llm-vigil stack running from {run_dir}", flush=True)
    for part in parts:
        print(f"  {part.name:<13} {part.url:<34} log: {part.log_path}", flush=True)
    for line in missing:
        print(f"  skipped: {line}", flush=True)
    print("Ctrl-C stops everything.", flush=True)
    try:
        code = supervise(parts, args.stop_after)
    finally:
        for part in reversed(parts):
            part.stop()
        print("stopped", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
