"""The stack without Docker: every part that exists on this machine, with the same files as
compose, each logging into a file, stopped together on Ctrl-C.

    python -m vigil.stack [--model demo] [--device auto] [--run-dir DIR] [PORT OPTIONS]
                          [-- INFERENCE ARGS...]
    python -m vigil.stack --engine vllm --engine-url http://127.0.0.1:8000 [--run-dir DIR]

Parts: the inference process (the embedded demo model unless --model says otherwise; left out,
with a line that says why, on a light install without the serve extra), the exporter (probing
the inference process), the notifier (``python -m notifier``: Alertmanager's webhook receiver,
whose lines also show on the console; started with Alertmanager only), and Alertmanager
(alerts/alertmanager.yml) and Prometheus (alerts/prometheus.yml with alerts/*.rules.yml) when
they are installed. The banner comes once the parts are started, with a page of each that shows
something (Alertmanager's alerts from its API, and an amtool line, where its web UI is missing,
as in Debian's package). The inference process is restarted when it exits (the watchdog exits
with 75 on a stall), as compose's restart policy does. Every part dies with the stack, even
when the stack is killed, and a console that goes away stops none (vigil/stackparts.py).

Ports, all on 127.0.0.1: inference 8000, exporter 9400, Prometheus 9090, Alertmanager 9093,
notifier 5001 (those the shipped alerts/prometheus.yml and alerts/alertmanager.yml name), each
changed by its option (--inference-port, ...). When one differs, the stack writes the two
configurations into the run directory with the addresses moved. Every port is tried before
anything starts: a busy one stops the stack with one line naming the port, the part that
wanted it and the process that holds it.

With --engine (vigil, vllm, sglang or tgi) and --engine-url, the stack watches an engine that
is already running instead of starting ours: no inference process; the exporter probes the
engine (--target ENGINE=URL, and finds its processes from the URL's port when it runs on this
host); Prometheus loads a configuration written into the run directory, alerts/prometheus.yml
plus a scrape job named after the engine for the engine's own /metrics, which the recording
rules of alerts/engines.py map to one vocabulary. The shipped file is left as it is.
"""

from __future__ import annotations

import argparse
import copy
import errno
import importlib.util
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml

from . import extras
from .engines import ENGINES, parse_target, recognise
from .listen import try_bind
from .netproc import listener_of
from .stackparts import Part, log_tail, say

REPO = Path(__file__).resolve().parents[1]
ALERTS = REPO / "alerts"
RESTART_BACKOFF_S = (1, 2, 5, 10, 30)
HOST = "127.0.0.1"
# The ports the shipped alerts/prometheus.yml and alerts/alertmanager.yml name (and compose).
DEFAULT_PORTS = {
    "inference": 8000,
    "exporter": 9400,
    "prometheus": 9090,
    "alertmanager": 9093,
    "notifier": 5001,
}
PART_TITLES = {
    "inference": "the inference process's API and /metrics",
    "exporter": "the exporter's /metrics",
    "prometheus": "Prometheus",
    "alertmanager": "Alertmanager",
    "notifier": "the notifier, Alertmanager's webhook receiver",
}
# --rules.alert.resend-delay, "Minimum amount of time to wait before resending an alert to
# Alertmanager" (default 1m; https://prometheus.io/docs/prometheus/latest/command-line/prometheus/).
# Two things hang on it (in Prometheus's source, v2.42.0 as Debian ships it and v3.13.2 as
# compose runs it alike):
# - How soon an alert that fired before Prometheus found Alertmanager gets there. Alerts sent
#   before the Alertmanagers are discovered are dropped (notifier/notifier.go: sendAll finds
#   none to post to, Manager.Run counts the batch as dropped; static targets come within 5 s
#   of the start, discovery/manager.go's updatert), and an alert is sent again at the first
#   evaluation strictly later than its last send plus the delay (rules/alerting.go,
#   Alert.needsSending), evaluations being exact multiples of the interval apart
#   (rules/manager.go, Group.EvalTimestamp). With the 10 s evaluation_interval of
#   alerts/prometheus.yml, any delay from 20 s to under 30 s resends at the third evaluation,
#   30 s after a send: the Watchdog, fired at the first evaluation, reaches Alertmanager
#   within some 40 s of the start; with the default, 70 s after that first evaluation.
# - How long an alert stays firing at Alertmanager without word from Prometheus. Each send
#   carries EndsAt = its evaluation time + 4 x max(evaluation interval, resend delay)
#   (rules/alerting.go, AlertingRule.sendAlerts sets ValidUntil; rules/manager.go, SendAlerts
#   makes it EndsAt); Alertmanager resolves the alert once EndsAt has passed. Alertmanager's
#   resolve_timeout (5m in alerts/alertmanager.yml) plays no part: it only fills in an EndsAt
#   left empty (api/v2/api.go, postAlertsHandler, in Alertmanager 0.25), and Prometheus never
#   leaves it empty.
# 10s (as before) resent every 20 s and made alerts valid for 40 s: a Prometheus restart whose
# first send after the start was dropped, however quick, resolved every firing alert, and the
# notifier printed and relayed RESOLVED for live incidents. 25s resends every 30 s, as 20s
# would, and keeps alerts valid for 100 s. Across a restart an alert is sent again at most
# 30 s (since its last send) + the restart + 10 s (the first evaluation) + 30 s (when that
# send is dropped) after its last send: restarts up to 30 s resolve nothing (up to 60 s when
# the first send gets through). 30s would give 2 min but resend every 40 s (the Watchdog some
# 50 s after a start); the default 1m gives 4 min, with a minute's wait. The compose files
# pass the same value (tests/test_compose.py checks that they agree).
RESEND_DELAY = "25s"

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


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError("must be a TCP port from 1 to 65535")
    return value


def ports_of(args: argparse.Namespace) -> dict[str, int]:
    """The port of each part: its option, else the default."""
    return {
        name: getattr(args, f"{name}_port", None) or default
        for name, default in DEFAULT_PORTS.items()
    }


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


# The fast path of hang alerts (issue 18): the series the hang rule group reads from a job
# (alerts.rules.HANG_SERIES, by job) are scraped every 2 s by a job of their own, named after it
# with this suffix, and dropped from the job itself, so that each series is stored once. The
# fast job's samples are relabelled to the job's name: every series keeps the labels it had,
# only `up` and scrape_* tell the two jobs apart.
HANG_JOB_SUFFIX = "-hang"
EXPORTER_JOB = "vigil-exporter"


def hang_series(job: str) -> list[str]:
    """The metric names the hang rule group reads from ``job``'s targets (none: no fast job)."""
    from alerts.rules import HANG_SERIES

    names = sorted(HANG_SERIES.get(job, ()))
    for name in names:  # the names go into a relabel regex as they are
        if not re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", name):
            raise ValueError(f"HANG_SERIES[{job!r}] holds {name!r}, not a metric name")
    return names


def hang_scrape_timing() -> dict[str, str]:
    """scrape_interval and scrape_timeout of alerts/prometheus.yml's fast exporter job, which
    every fast job takes (the engines' here, the PodMonitors' in tools/operator_resources.py)."""
    config = yaml.safe_load((ALERTS / "prometheus.yml").read_text(encoding="utf-8"))
    (job,) = [
        job for job in config["scrape_configs"] if job["job_name"] == EXPORTER_JOB + HANG_JOB_SUFFIX
    ]
    return {key: job[key] for key in ("scrape_interval", "scrape_timeout")}


def names_regex(names: Iterable[str]) -> str:
    """A relabel regex that matches exactly these metric names (Prometheus anchors it)."""
    return "|".join(names)


def engine_scrape_jobs(engine: str, url: str) -> list[dict[str, Any]]:
    """The engine's scrape job, and when the hang rule group reads series of it
    (alerts.rules.HANG_SERIES[engine]) a fast job ``<engine>-hang`` for those: the job drops
    them, the fast job keeps only them. The fast job scrapes the engine's whole /metrics and
    keeps the names after the scrape (metric_relabel_configs), without name[]: vLLM's /metrics
    is prometheus-fastapi-instrumentator's handler (generate_latest of the whole registry, any
    query ignored; vllm/entrypoints/serve/instrumentator/metrics.py adds it before the
    prometheus_client app), SGLang's registry of a MultiProcessCollector answers name[] with
    nothing (a collector without names is filtered only in a registry built with
    support_collectors_without_names=True, prometheus_client 0.25+, docs/content/multiprocess),
    TGI's router renders every metric whatever the query. The cost is the engine rendering its
    whole /metrics every 2 s; what is stored is only the hang series every 2 s."""
    job = engine_scrape_job(engine, url)
    names = hang_series(engine)
    if not names:
        return [job]
    fast = {
        "job_name": engine + HANG_JOB_SUFFIX,
        **hang_scrape_timing(),
        **{key: copy.deepcopy(value) for key, value in job.items() if key != "job_name"},
        "metric_relabel_configs": [
            {"source_labels": ["__name__"], "regex": names_regex(names), "action": "keep"},
            {"target_label": "job", "replacement": engine},
        ],
    }
    job["metric_relabel_configs"] = [
        {"source_labels": ["__name__"], "regex": names_regex(names), "action": "drop"}
    ]
    return [job, fast]


def moved_addresses(ports: Mapping[str, int]) -> dict[str, str]:
    """``127.0.0.1:<default>`` (and ``localhost:<default>``) to the same host at the part's
    port, for each part whose port is not the default."""
    moved = {}
    for name, default in DEFAULT_PORTS.items():
        port = ports.get(name, default)
        if port != default:
            for host in (HOST, "localhost"):
                moved[f"{host}:{default}"] = f"{host}:{port}"
    return moved


def _move(node: Any, moved: Mapping[str, str]) -> Any:
    """A configuration with every address ``host:port`` (a target) and every http(s) URL at one
    (a webhook) moved as ``moved`` says; the rest as it is."""
    if isinstance(node, dict):
        return {key: _move(value, moved) for key, value in node.items()}
    if isinstance(node, list):
        return [_move(value, moved) for value in node]
    if isinstance(node, str):
        if node in moved:
            return moved[node]
        if node.startswith(("http://", "https://")):
            parts = urlsplit(node)
            if parts.netloc in moved:
                return urlunsplit(parts._replace(netloc=moved[parts.netloc]))
    return node


def prometheus_config(
    engine: str | None,
    url: str | None,
    rule_files: Iterable[str],
    ports: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """alerts/prometheus.yml with ``rule_files`` in place of its own (relative to it), its
    targets and Alertmanager moved to ``ports``, and a scrape job for the engine's /metrics when
    ``engine`` is given (and its fast job for the hang series, engine_scrape_jobs): what the
    stack writes for --engine or other ports, and what the compose overrides for vLLM and SGLang
    ship (compose/prometheus/, checked by the tests)."""
    config = yaml.safe_load((ALERTS / "prometheus.yml").read_text(encoding="utf-8"))
    config["rule_files"] = list(rule_files)
    config = _move(config, moved_addresses(ports or DEFAULT_PORTS))
    if engine is not None and url is not None:
        jobs = [job["job_name"] for job in config["scrape_configs"]]
        added = engine_scrape_jobs(engine, url)
        for job in added:
            if job["job_name"] in jobs:
                raise ValueError(f"alerts/prometheus.yml already has a job named {job['job_name']}")
        config["scrape_configs"] += added
    return config


def alertmanager_config(ports: Mapping[str, int]) -> dict[str, Any]:
    """alerts/alertmanager.yml with its webhooks moved to the notifier's port (any address of a
    part that moved, in fact) and its templates by absolute path: the file is loaded from the
    run directory, and Alertmanager reads template paths relative to the file."""
    config = yaml.safe_load((ALERTS / "alertmanager.yml").read_text(encoding="utf-8"))
    config = _move(config, moved_addresses(ports))
    if "templates" in config:
        config["templates"] = [str(ALERTS / path) for path in config["templates"]]
    return config


def render_prometheus_config(config: dict[str, Any], header: str) -> str:
    lines = "".join(f"# {line}".rstrip() + "\n" for line in header.splitlines())
    return lines + yaml.safe_dump(config, sort_keys=False, default_flow_style=False)


def _port_note(ports: Mapping[str, int]) -> str:
    moved = [f"--{name}-port {port}" for name, port in ports.items() if port != DEFAULT_PORTS[name]]
    return f" and {' '.join(moved)}" if moved else ""


def write_prometheus_config(
    path: Path, engine: str | None, url: str | None, ports: Mapping[str, int] | None = None
) -> Path:
    """The Prometheus configuration for watching ``engine`` at ``url`` (None: our inference
    process, through the exporter), with the parts at ``ports``, written to ``path``, loading
    the repository's alerts/*.rules.yml by absolute path."""
    ports = ports or DEFAULT_PORTS
    config = prometheus_config(engine, url, [str(ALERTS / "*.rules.yml")], ports)
    what = f"--engine {engine} --engine-url {url}" if engine else "the stack"
    header = (
        f"Written by vigil.stack for {what}{_port_note(ports)}:\n"
        f"{ALERTS / 'prometheus.yml'} with the alert rules by absolute path"
        + (" and the scrape jobs for\nthe engine's own /metrics" if engine else "")
        + (", the addresses moved to those ports" if _port_note(ports) else "")
        + ".\nRewritten at every start; change alerts/prometheus.yml instead."
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_prometheus_config(config, header), encoding="utf-8")
    return path


def write_alertmanager_config(path: Path, ports: Mapping[str, int]) -> Path:
    header = (
        f"Written by vigil.stack for{_port_note(ports).removeprefix(' and')}:\n"
        f"{ALERTS / 'alertmanager.yml'} with the webhooks moved to those ports and the templates\n"
        "by absolute path. Rewritten at every start; change alerts/alertmanager.yml instead."
    )
    config = alertmanager_config(ports)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_prometheus_config(config, header), encoding="utf-8")
    return path


def prometheus_page(binary: str) -> str:
    """The path of the alerts page of the Prometheus at ``binary``: Prometheus 2's UI answers
    under /classic/ (Debian's package ships only that one; upstream's React UI also has
    /alerts), Prometheus 3's under /alerts (the classic UI is gone)."""
    try:
        result = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
        found = re.search(r"version (\d+)\.", result.stdout + result.stderr)
    except (OSError, subprocess.SubprocessError):
        found = None
    return "/alerts" if found and int(found[1]) >= 3 else "/classic/alerts"


# What Debian's prometheus-alertmanager serves at / and /#/alerts in place of the web UI, which
# its package leaves out (/usr/share/prometheus/alertmanager/no-ui/index.html): "The Debian
# package of the alertmanager does not include a web application. Please, use the amtool
# command-line application to obtain equivalent functionality."
NO_WEB_UI = "does not include a web application"
_LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxy for 127.0.0.1


def alertmanager_pages(url: str, has_ui: bool | None) -> tuple[list[tuple[str, str]], list[str]]:
    """The pages the banner prints for the Alertmanager at ``url``, and its notes: the alerts
    page of its web UI; where there is no UI (Debian's package), the alerts as JSON from its
    API and the amtool command that lists them. ``has_ui`` None (not known): the UI's page, as
    Alertmanager's own builds have it."""
    if has_ui is False:
        return [("alerts as JSON", f"{url}/api/v2/alerts")], [
            "no web UI in this Alertmanager (Debian's package has none); the alerts in a terminal:",
            f"amtool alert query --alertmanager.url={url}",
        ]
    return [("alerts", f"{url}/#/alerts")], []


def alertmanager_has_ui(url: str, part: Part, wait: float = 10.0) -> bool | None:
    """Whether the Alertmanager at ``url`` serves its web UI at / (False: Debian's page saying
    it has none), asked until it answers, for ``wait`` seconds at most; None when it did not
    answer (or ``part`` exited)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            with _LOOPBACK.open(f"{url}/", timeout=2) as response:
                page = response.read(1 << 20).decode("utf-8", errors="replace")
            return NO_WEB_UI not in " ".join(page.split())
        except (OSError, ValueError):
            pass
        exited = part.process is None or part.process.poll() is not None
        if exited or time.monotonic() >= deadline:
            return None
        time.sleep(0.1)


def settle_pages(parts: list[Part]) -> None:
    """The pages of the parts that can be known only once they run: Alertmanager's."""
    for part in parts:
        if part.name == "alertmanager" and part.port is not None:
            url = f"http://{HOST}:{part.port}"
            part.pages, part.notes = alertmanager_pages(url, alertmanager_has_ui(url, part))


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


def notifier_missing() -> str | None:
    """Why the notifier cannot start here (None: it can)."""
    try:
        found = importlib.util.find_spec("notifier.__main__")
    except (ImportError, ValueError):
        found = None
    return None if found else "notifier: the notifier package is not in this install"


def plan(args: argparse.Namespace, run_dir: Path) -> tuple[list[Part], list[str]]:
    """The parts to start, in the order to start them, and a line for each part that is
    missing here. Writes the configurations the parts need into ``run_dir``."""
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    state = run_dir / "state"
    python = sys.executable
    ports = ports_of(args)
    moved = ports != DEFAULT_PORTS
    parts = []
    missing = []
    engine = getattr(args, "engine", None)
    lacking = extras.missing_serve_modules()
    inference = f"http://{HOST}:{ports['inference']}"
    if engine:  # watching an engine that runs already: nothing of ours serves
        target = f"{engine}={args.engine_url}"
    elif lacking:  # a light install: the exporter and the rest watch whatever serves there
        target = inference
        missing.append(f"inference: needs {', '.join(lacking)} ({extras.SERVE_INSTALL})")
    else:
        target = inference
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
                    HOST,
                    "--port",
                    str(ports["inference"]),
                    "--state-dir",
                    str(state),
                    *args.inference_args,
                ],
                logs / "inference.log",
                pages=[
                    ("models", f"{inference}/v1/models"),
                    ("metrics", f"{inference}/metrics"),
                    ("API base for OpenAI clients (not a page)", f"{inference}/v1"),
                ],
                port=ports["inference"],
                option="--inference-port",
                restart=True,
            )
        )
    exporter = f"http://{HOST}:{ports['exporter']}"
    parts.append(
        Part(
            "exporter",
            [
                python,
                "-m",
                "exporter",
                "--host",
                HOST,
                "--port",
                str(ports["exporter"]),
                "--state-dir",
                str(state),
                "--target",
                target,
            ],
            logs / "exporter.log",
            pages=[("metrics", f"{exporter}/metrics")],
            port=ports["exporter"],
            option="--exporter-port",
        )
    )
    alertmanager = _binary("prometheus-alertmanager", "alertmanager")
    # The notifier only with Alertmanager, whose notifications it receives: without it, it
    # would hear nothing, and its dead man's switch would report the pipeline broken after
    # --watchdog-timeout and every hour, of an Alertmanager the banner says is not there.
    # Started first, so that it listens when Alertmanager sends (the Watchdog's at once).
    why_not = notifier_missing()
    if why_not:
        missing.append(why_not)
    elif not alertmanager:
        missing.append(
            "notifier: not started without Alertmanager, whose notifications it receives"
        )
    else:
        notifier = f"http://{HOST}:{ports['notifier']}"
        parts.append(
            Part(
                "notifier",
                [python, "-m", "notifier", "--host", HOST, "--port", str(ports["notifier"])],
                logs / "notifier.log",
                pages=[("", f"{notifier}/")],
                port=ports["notifier"],
                option="--notifier-port",
                echo=True,
                env={"PYTHONUNBUFFERED": "1"},  # each notification as it comes
            )
        )
    if alertmanager:
        config = ALERTS / "alertmanager.yml"
        if moved:
            config = write_alertmanager_config(run_dir / "alertmanager.yml", ports)
        alertmanager_url = f"http://{HOST}:{ports['alertmanager']}"
        parts.append(
            Part(
                "alertmanager",
                [
                    alertmanager,
                    f"--config.file={config}",
                    f"--storage.path={run_dir / 'alertmanager'}",
                    f"--web.listen-address={HOST}:{ports['alertmanager']}",
                    "--cluster.listen-address=",
                ],
                logs / "alertmanager.log",
                pages=alertmanager_pages(alertmanager_url, has_ui=None)[0],  # see settle_pages
                port=ports["alertmanager"],
                option="--alertmanager-port",
            )
        )
    else:
        missing.append(
            "alertmanager: not installed (Debian: apt-get install prometheus-alertmanager)"
        )
    config = ALERTS / "prometheus.yml"
    if engine or moved:  # written either way: it also serves a Prometheus of one's own
        url = args.engine_url if engine else None
        config = write_prometheus_config(run_dir / "prometheus.yml", engine, url, ports)
    prometheus = _binary("prometheus")
    if prometheus:
        parts.append(
            Part(
                "prometheus",
                [
                    prometheus,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={run_dir / 'prometheus'}",
                    f"--web.listen-address={HOST}:{ports['prometheus']}",
                    f"--rules.alert.resend-delay={RESEND_DELAY}",  # see RESEND_DELAY
                ],
                logs / "prometheus.log",
                pages=[
                    ("alerts", f"http://{HOST}:{ports['prometheus']}{prometheus_page(prometheus)}")
                ],
                port=ports["prometheus"],
                option="--prometheus-port",
            )
        )
    else:
        missing.append("prometheus: not installed (Debian: apt-get install prometheus)")
    missing.append("grafana, loki, alloy, tempo: run with Docker (compose/) to have them")
    return parts, missing


def busy_ports(parts: list[Part]) -> list[str]:
    """A line for each part whose port cannot be bound now (tried as our servers bind it), with
    the process that holds it; empty when every port is free."""
    lines = []
    for part in parts:
        if part.port is None:
            continue
        error = try_bind(HOST, part.port)
        if error is None:
            continue
        where = f"port {part.port} ({part.name}, {part.option})"
        if error.errno == errno.EADDRINUSE:
            holder = listener_of(part.port, HOST)
            who = f"in use by {holder}" if holder else "in use (no listening process found)"
            lines.append(f"{where} is {who}: stop it, or choose another port with {part.option}")
        else:
            lines.append(
                f"{where} cannot be listened on at {HOST}: {error.strerror or error}; "
                f"choose another port with {part.option}"
            )
    return lines


def _say_tail(part: Part) -> None:
    tail = log_tail(part.log_path)
    if not tail:
        say(f"  ({part.log_path} is empty)")
        return
    say(f"  the last lines of {part.log_path}:")
    for line in tail:
        say(f"  {part.name} | {line}")


def supervise(parts: list[Part], stop_after: float | None = None) -> int:
    """Restart what should be restarted; return when told to stop (or a part gave up)."""
    stopping = {"flag": False}

    def ask_stop(*_):
        stopping["flag"] = True

    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, ask_stop)
    deadline = None if stop_after is None else time.monotonic() + stop_after
    due: dict[str, float] = {}
    while not stopping["flag"] and (deadline is None or time.monotonic() < deadline):
        for part in parts:
            code = part.process.poll() if part.process is not None else None
            if code is None:
                continue
            if not part.restart:
                say(f"{part.name} exited with status {code}; stopping the stack")
                _say_tail(part)
                return 1
            if part.name not in due:
                delay = RESTART_BACKOFF_S[min(part.restarts, len(RESTART_BACKOFF_S) - 1)]
                if code == 75:
                    say(
                        f"{part.name} exited with status 75 (the watchdog found a stall: its "
                        f"report is in {part.log_path}); restarting in {delay} s"
                    )
                else:
                    say(f"{part.name} exited with status {code}; restarting in {delay} s")
                    _say_tail(part)
                due[part.name] = time.monotonic() + delay
            elif time.monotonic() >= due[part.name]:
                del due[part.name]
                part.restarts += 1
                part.start(REPO)
        time.sleep(0.5)
    return 0


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--engine and --engine-url go together, and leave out what only our process takes; no
    two parts on one port (exit 2 with a line that says so, as argparse does)."""
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
                ("--inference-port", args.inference_port),
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
    by_port: dict[int, list[str]] = {}
    for name, port in ports_of(args).items():
        if args.engine and name == "inference":
            continue
        by_port.setdefault(port, []).append(f"--{name}-port")
    for port, options in by_port.items():
        if len(options) > 1:
            parser.error(f"{' and '.join(options)} are both {port}: give each part its own port")


def banner(
    run_dir: Path,
    parts: list[Part],
    missing: list[str],
    ports: Mapping[str, int],
    watching: list[str],
) -> None:
    """What runs where: a page that opens for each part (others labelled as not pages), its
    log, what is skipped and why, and the ports with the options that change them."""
    say(f"llm-vigil stack running from {run_dir}")
    for line in watching:
        say(f"  {line}")
    for part in parts:
        say(f"  {part.name:<13} {part.url:<40} log: {part.log_path}")
        for label, url in part.pages[1:]:
            say(f"  {'':<13} {label}: {url}")
        for note in part.notes:
            say(f"  {'':<13} {note}")
        if part.echo:
            say(f"  {'':<13} its output also shows here, after '{part.name} | '")
    for line in missing:
        say(f"  skipped: {line}")
    say(
        "  ports: "
        + ", ".join(f"{name} {port}" for name, port in ports.items())
        + " (options --inference-port, --exporter-port, --prometheus-port, "
        "--alertmanager-port, --notifier-port)"
    )


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
        help="where state, data, logs and written configurations go (default: a new directory "
        "under the system's temp)",
    )
    for name, default in DEFAULT_PORTS.items():
        parser.add_argument(
            f"--{name}-port",
            type=_port,
            metavar="PORT",
            help=f"port of {PART_TITLES[name]} on {HOST} (default {default})",
        )
    parser.add_argument("--stop-after", type=float, help=argparse.SUPPRESS)  # for the tests
    parser.add_argument(
        "inference_args", nargs="*", help="more arguments for the inference process (after --)"
    )
    args = parser.parse_args(argv)
    _check_args(parser, args)
    ports = ports_of(args)
    if args.engine:
        del ports["inference"]
    made = args.run_dir is None
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="vigil-stack-")).resolve()
    parts, missing = plan(args, run_dir)
    busy = busy_ports(parts)
    if busy:
        for line in busy:
            say(f"llm-vigil stack: not started: {line}", sys.stderr)
        if made:
            shutil.rmtree(run_dir, ignore_errors=True)
        return 1
    watching = []
    if args.engine:
        job = engine_scrape_job(args.engine, args.engine_url)
        watching = [
            f"watching      {args.engine} at {args.engine_url} (running already; no inference "
            "process started)",
            f"              the exporter probes it (--target {args.engine}={args.engine_url});"
            f" Prometheus scrapes {job.get('metrics_path', '/metrics')} at "
            f'{job["static_configs"][0]["targets"][0]} as job "{args.engine}" '
            f"({run_dir / 'prometheus.yml'})",
            f"              {check_engine(args.engine, args.engine_url)}",
        ]
    started: list[Part] = []
    try:
        for part in parts:
            part.start(REPO)
            started.append(part)
        settle_pages(parts)  # then the banner, with pages that show something
        banner(run_dir, parts, missing, ports, watching)
        say("Ctrl-C stops everything.")
        code = supervise(parts, args.stop_after)
    finally:
        for part in reversed(started):
            part.stop()
        say("stopped")
    return code


if __name__ == "__main__":
    sys.exit(main())
