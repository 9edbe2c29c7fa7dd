"""The stack without Docker: every part that exists on this machine, with the same files as
compose, each logging into a file, stopped together on Ctrl-C.

    python -m vigil.stack [--model demo] [--device auto] [--run-dir DIR] [-- INFERENCE ARGS...]
    python -m vigil.stack --engine vllm --engine-url http://127.0.0.1:8000 [--run-dir DIR]

Parts: the inference process (the embedded demo model unless --model says otherwise; left out,
with a line that says why, on a light install without the serve extra), the exporter (probing
the inference process), and Prometheus (alerts/prometheus.yml with alerts/*.rules.yml) and
Alertmanager (alerts/alertmanager.yml) when they are installed. The inference process is
restarted when it exits (the watchdog exits with 75 on a stall), as compose's restart policy
does. Ports are those of alerts/prometheus.yml: inference 8000, exporter 9400, Prometheus 9090,
Alertmanager 9093, all on 127.0.0.1.

With --engine (vigil, vllm, sglang or tgi) and --engine-url, the stack watches an engine that
is already running instead of starting ours: no inference process; the exporter probes the
engine (--target ENGINE=URL, and finds its processes from the URL's port when it runs on this
host); Prometheus loads a configuration written into the run directory, alerts/prometheus.yml
plus a scrape job named after the engine for the engine's own /metrics, which the recording
rules of alerts/engines.py map to one vocabulary. The shipped file is left as it is.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import yaml

from . import extras
from .engines import ENGINES, parse_target, recognise

REPO = Path(__file__).resolve().parents[1]
ALERTS = REPO / "alerts"
RESTART_BACKOFF_S = (1, 2, 5, 10, 30)

# Where each engine serves its Prometheus metrics (docs/engines.md, "How each engine's
# exposition works"), said when the engine's /metrics does not answer.
METRICS_HINTS = {
    "vigil": "our inference process serves /metrics on its API port (--port)",
    # vllm/entrypoints/common/cli_args.py @0.33.0: the API server's port, default 8000.
    "vllm": "vLLM serves /metrics on its API port (vllm serve --port, default 8000)",
    # python/sglang/srt/arg_groups/fields/observability.py:70 and entrypoints/http_server.py:314
    # @0.5.23: the route exists only with --enable-metrics (default off).
    "sglang": "SGLang serves /metrics on its HTTP port (default 30000) only when started with "
    "--enable-metrics",
    # router/src/server.rs @v3.3.7: the router's own HTTP port (launcher --port; 80 in the image).
    "tgi": "TGI serves /metrics on the router's HTTP port (text-generation-launcher --port)",
}


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


def _scrape_address(url: str) -> str:
    """host:port of a URL, as a Prometheus target (the scheme's port when none is given)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    return f"{host}:{parts.port or (443 if parts.scheme == 'https' else 80)}"


def engine_scrape_job(engine: str, url: str) -> dict[str, Any]:
    """The scrape job for an engine's own /metrics: named after the engine (the recording rules
    of alerts/engines.py select the engine by its metric names, not by the job), at the URL's
    host and port, under the URL's path if it has one (as the exporter's probe does)."""
    parts = urlsplit(url)
    job: dict[str, Any] = {"job_name": engine}
    path = parts.path.rstrip("/") + "/metrics"
    if path != "/metrics":
        job["metrics_path"] = path
    if parts.scheme == "https":
        job["scheme"] = "https"
    job["static_configs"] = [{"targets": [_scrape_address(url)]}]
    return job


def prometheus_config(engine: str, url: str, rule_files: Iterable[str]) -> dict[str, Any]:
    """alerts/prometheus.yml with ``rule_files`` in place of its own (relative to it) and a
    scrape job for the engine's /metrics: what the stack writes for --engine, and what the
    compose overrides for vLLM and SGLang ship (compose/prometheus/, checked by the tests)."""
    config = yaml.safe_load((ALERTS / "prometheus.yml").read_text(encoding="utf-8"))
    config["rule_files"] = list(rule_files)
    jobs = [job["job_name"] for job in config["scrape_configs"]]
    if engine in jobs:
        raise ValueError(f"alerts/prometheus.yml already has a job named {engine}")
    config["scrape_configs"].append(engine_scrape_job(engine, url))
    return config


def render_prometheus_config(config: dict[str, Any], header: str) -> str:
    lines = "".join(f"# {line}".rstrip() + "\n" for line in header.splitlines())
    return lines + yaml.safe_dump(config, sort_keys=False, default_flow_style=False)


def write_prometheus_config(path: Path, engine: str, url: str) -> Path:
    """The Prometheus configuration for watching ``engine`` at ``url``, written to ``path``,
    loading the repository's alerts/*.rules.yml by absolute path."""
    config = prometheus_config(engine, url, [str(ALERTS / "*.rules.yml")])
    header = (
        f"Written by vigil.stack for --engine {engine} --engine-url {url}:\n"
        f"{ALERTS / 'prometheus.yml'} with the alert rules by absolute path and a scrape job for\n"
        "the engine's own /metrics.\n"
        "Rewritten at every start; change alerts/prometheus.yml instead."
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_prometheus_config(config, header), encoding="utf-8")
    return path


def check_engine(engine: str, url: str, timeout: float = 3.0) -> str:
    """A line on what the engine's /metrics says now (the stack starts all the same: the engine
    may still be loading its model)."""
    metrics = url.rstrip("/") + "/metrics"
    try:
        with urllib.request.urlopen(metrics, timeout=timeout) as response:  # noqa: S310 - http(s) only (parse_target)
            text = response.read(4 << 20).decode("utf-8", errors="replace")
    except urllib.error.HTTPError as exc:
        return f"GET {metrics} answered {exc.code}: {METRICS_HINTS[engine]}"
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return f"GET {metrics} failed ({reason}); not up yet? {METRICS_HINTS[engine]}"
    found = recognise(text)
    if found and found != engine:
        return f"{metrics} answers with {found}'s metrics, not {engine}'s: check --engine"
    if found is None:
        return f"{metrics} answers, without {engine}'s metric names (yet)"
    return f"{metrics} answers with {engine}'s metrics"


def plan(args: argparse.Namespace, run_dir: Path) -> tuple[list[Part], list[str]]:
    """The parts to start, and a line for each part that is missing here."""
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    state = run_dir / "state"
    python = sys.executable
    parts = []
    missing = []
    engine = getattr(args, "engine", None)
    lacking = extras.missing_serve_modules()
    if engine:  # watching an engine that runs already: nothing of ours serves
        target = f"{engine}={args.engine_url}"
    elif lacking:  # a light install: the exporter and the rest watch whatever serves on :8000
        target = "http://127.0.0.1:8000"
        missing.append(f"inference: needs {', '.join(lacking)} ({extras.SERVE_INSTALL})")
    else:
        target = "http://127.0.0.1:8000"
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
                target,
            ],
            "http://127.0.0.1:9400/metrics",
            logs / "exporter.log",
        ),
    ]
    config = ALERTS / "prometheus.yml"
    if engine:  # written either way: it also serves a Prometheus of one's own
        config = write_prometheus_config(run_dir / "prometheus.yml", engine, args.engine_url)
    prometheus = _binary("prometheus")
    if prometheus:
        parts.append(
            Part(
                "prometheus",
                [
                    prometheus,
                    f"--config.file={config}",
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


def _check_engine_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--engine and --engine-url go together, and leave out what only our process takes (exit
    2 with a line that says so, as argparse does)."""
    if args.engine and not args.engine_url:
        parser.error(
            f"--engine {args.engine} needs --engine-url, the base URL of the running engine "
            "(e.g. --engine-url http://127.0.0.1:8000)"
        )
    if args.engine_url and not args.engine:
        parser.error(f"--engine-url needs --engine, the engine there ({', '.join(ENGINES)})")
    if args.engine:
        try:
            args.engine_url = parse_target(f"{args.engine}={args.engine_url}").url
        except ValueError as exc:
            reason = str(exc).removesuffix(", after ENGINE= if any")
            parser.error(f"--engine-url {args.engine_url!r} {reason}")
        ours = [
            flag
            for flag, value in (
                ("--model", args.model),
                ("--device", args.device),
                ("arguments after --", args.inference_args),
            )
            if value
        ]
        if ours:
            parser.error(
                f"{' and '.join(ours)}: for our inference process, which --engine does not start"
            )
    args.model = args.model or "demo"
    args.device = args.device or "auto"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vigil.stack", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--model",
        help="model for the inference process (default: the embedded demo model)",
    )
    parser.add_argument("--device", help="auto (the default), cpu, cuda or cuda:N")
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        help="watch an engine that is already running instead of starting ours (needs "
        "--engine-url)",
    )
    parser.add_argument(
        "--engine-url",
        metavar="URL",
        help="base URL of that engine's API, where it also serves /metrics "
        "(e.g. http://127.0.0.1:8000 for vLLM, http://127.0.0.1:30000 for SGLang)",
    )
    parser.add_argument(
        "--run-dir",
        help="where state, data and logs go (default: a new directory under the system's temp)",
    )
    parser.add_argument("--stop-after", type=float, help=argparse.SUPPRESS)  # for the tests
    parser.add_argument(
        "inference_args", nargs="*", help="more arguments for the inference process (after --)"
    )
    args = parser.parse_args(argv)
    _check_engine_args(parser, args)
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="vigil-stack-")).resolve()
    parts, missing = plan(args, run_dir)
    for part in parts:
        part.start()
    print(f"llm-vigil stack running from {run_dir}", flush=True)
    if args.engine:
        print(
            f"  watching      {args.engine} at {args.engine_url} (running already; no inference "
            "process started)",
            flush=True,
        )
        job = engine_scrape_job(args.engine, args.engine_url)
        print(
            f"                the exporter probes it (--target {args.engine}={args.engine_url});"
            f" Prometheus scrapes {job.get('metrics_path', '/metrics')} at "
            f'{job["static_configs"][0]["targets"][0]} as job "{args.engine}" '
            f"({run_dir / 'prometheus.yml'})",
            flush=True,
        )
        print(f"                {check_engine(args.engine, args.engine_url)}", flush=True)
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
