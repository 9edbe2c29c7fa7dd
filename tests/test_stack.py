"""The stack without Docker (the README's main command): every installed part starts on its
port with the repository's files (configurations written into the run directory when the ports
are not the default ones), the inference process comes back after its watchdog exits, Ctrl-C
stops everything, and so does a SIGKILL of the stack itself; a busy port stops the start with
one line that names its holder. With --engine it watches an engine that runs already: no
inference process of its own, the exporter probing the engine, and Prometheus scraping the
engine's /metrics from a configuration written into the run directory.

Every test that starts the stack gives it free ports of its own (not the defaults 8000, 9400,
9090, 9093, 5001, which another server on this machine may hold)."""

from __future__ import annotations

import argparse
import errno
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
import yaml
from conftest import start_server
from prometheus_client.parser import text_string_to_metric_families
from stack_ports import free_ports, is_free, port_args

from alerts.rules import HANG_SERIES
from vigil import netproc
from vigil import stack as vigil_stack
from vigil.stackparts import Part

REPO = Path(__file__).resolve().parents[1]
ALERTS = REPO / "alerts"
PROMTOOL = shutil.which("promtool")
AMTOOL = shutil.which("amtool")
HAS_PROMETHEUS = shutil.which("prometheus") is not None
HAS_ALERTMANAGER = bool(shutil.which("prometheus-alertmanager") or shutil.which("alertmanager"))
HAS_NOTIFIER = vigil_stack.notifier_missing() is None
# The Watchdog fires at Prometheus's first evaluation, at most one evaluation interval (10 s)
# after Prometheus is ready; when that first send is dropped (Alertmanager not discovered yet),
# the resend delay of 25 s brings it again at the third evaluation, 30 s later: within about
# 40 s (with Prometheus's default of 1m, 70 s after the first evaluation). A bound well under a
# minute, with room for a busy machine.
WATCHDOG_BOUND_S = 50


def start_stack(out: Path, *args: str) -> subprocess.Popen:
    with open(out, "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "vigil.stack", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )


def _wait(predicate, timeout: float, what: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except requests.RequestException:
            pass
        if process.poll() is not None:
            raise AssertionError(f"the stack exited while waiting for {what}:\n{log.read_text()}")
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}")


def _ok(url: str) -> bool:
    return requests.get(url, timeout=2).status_code == 200


# The banner: "  NAME  URL  log: PATH", then "  LABEL: URL" lines under it.
_PART_LINE = re.compile(r"^  (\w+) +(http://\S+) +log: (\S+)$")
_MORE_LINE = re.compile(r"^ {16}([^:]+): (http://\S+)$")


def printed_urls(text: str) -> tuple[dict[str, str], list[str], list[str]]:
    """The banner's part URLs by part, its other page URLs, and the URLs labelled not pages."""
    parts, pages, others = {}, [], []
    for line in text.splitlines():
        if found := _PART_LINE.match(line):
            parts[found[1]] = found[2]
        elif found := _MORE_LINE.match(line):
            (others if "not a page" in found[1] else pages).append(found[2])
    return parts, pages, others


def alertmanager_alerts(port: int) -> list[str]:
    alerts = requests.get(f"http://127.0.0.1:{port}/api/v2/alerts", timeout=2).json()
    return [alert["labels"]["alertname"] for alert in alerts]


def test_stack_starts_alerts_restarts_the_inference_process_and_stops_on_ctrl_c(tmp_path, demo_dir):
    """On ports of its own: every printed page opens; the Watchdog reaches Alertmanager within a
    bound well under Prometheus's default resend delay of a minute, and the notifier's line for
    it shows on the stack's console; a hang makes the watchdog exit and the stack brings the
    process back; Ctrl-C stops everything and frees every port."""
    ports = free_ports()
    out = tmp_path / "stack.out"
    run = tmp_path / "run"
    stack = start_stack(
        out,
        "--run-dir",
        str(run),
        *port_args(ports),
        "--",
        "--demo-dir",
        demo_dir,
        "--enable-fault-injection",
        "--stall-timeout",
        "1",
    )
    inference = f"http://127.0.0.1:{ports['inference']}"
    try:
        ready = lambda: _ok(f"{inference}/ready")  # noqa: E731
        _wait(ready, 120, "the inference process", stack, out)
        text = out.read_text()
        for name in ("inference", "exporter"):
            assert f"log: {run / 'logs' / name}.log" in text
        assert "  ports: " + ", ".join(f"{n} {p}" for n, p in ports.items()) in text, text
        parts, pages, others = printed_urls(text)
        assert parts["inference"] == f"{inference}/v1/models"
        assert parts["exporter"] == f"http://127.0.0.1:{ports['exporter']}/metrics"
        assert f"{inference}/metrics" in pages and others == [f"{inference}/v1"]
        _wait(
            lambda: "vigil_process_alive{" in requests.get(parts["exporter"], timeout=2).text,
            30,
            "the exporter",
            stack,
            out,
        )
        if HAS_PROMETHEUS:
            prometheus = f"http://127.0.0.1:{ports['prometheus']}"
            _wait(lambda: _ok(f"{prometheus}/-/ready"), 60, "Prometheus", stack, out)
            flags = requests.get(f"{prometheus}/api/v1/status/flags", timeout=2).json()["data"]
            assert flags["rules.alert.resend-delay"] == vigil_stack.RESEND_DELAY
            prometheus_ready = time.monotonic()

            def exporter_up() -> bool:
                targets = requests.get(f"{prometheus}/api/v1/targets", timeout=2).json()
                return any(
                    t["labels"]["job"] == "vigil-exporter"
                    and t["scrapeUrl"] == parts["exporter"]
                    and t["health"] == "up"
                    for t in targets["data"]["activeTargets"]
                )

            _wait(exporter_up, 60, "Prometheus scraping the exporter", stack, out)
        if HAS_PROMETHEUS and HAS_ALERTMANAGER:
            _wait(
                lambda: "Watchdog" in alertmanager_alerts(ports["alertmanager"]),
                WATCHDOG_BOUND_S - (time.monotonic() - prometheus_ready),
                "the Watchdog at Alertmanager",
                stack,
                out,
            )
            if HAS_NOTIFIER:
                _wait(
                    lambda: re.search(r"^notifier \| .*Watchdog", out.read_text(), re.M),
                    60,
                    "the notifier's line for the Watchdog on the stack's console",
                    stack,
                    out,
                )
                assert "Watchdog" in (run / "logs" / "notifier.log").read_text()
        # Every page the banner prints opens, and shows something.
        for url in [*parts.values(), *pages]:
            response = requests.get(url, timeout=10)
            assert response.status_code == 200, url
            assert vigil_stack.NO_WEB_UI not in " ".join(response.text.split()), url
        if HAS_ALERTMANAGER:
            _check_alertmanager_page(parts["alertmanager"], ports["alertmanager"], text)
        # A hang: the watchdog exits with 75 and the stack brings the process back.
        requests.post(
            f"{inference}/debug/fault",
            timeout=5,
            json={"fault": "hang", "stage": "decode", "seconds": None},
        )
        requests.post(
            f"{inference}/v1/completions",
            timeout=30,
            json={"model": "demo", "prompt": "hi", "max_tokens": 4},
        )
        _wait(
            lambda: "inference exited with status 75" in out.read_text(),
            30,
            "the watchdog's exit",
            stack,
            out,
        )
        _wait(ready, 120, "the restarted inference process", stack, out)
    finally:
        stack.send_signal(signal.SIGINT)
        code = stack.wait(60)
    assert code == 0, out.read_text()[-3000:]
    assert "stopped" in out.read_text()
    for name, port in ports.items():
        assert is_free(port), f"{name}'s port {port} still taken after Ctrl-C: {_taken(port)}"


def _check_alertmanager_page(url: str, port: int, banner: str) -> None:
    """The Alertmanager page the banner prints shows the alerts (the Watchdog among them, when
    Prometheus runs): its web UI's alerts page where it has one; else (Debian's package, whose
    / and /#/alerts say it has no web application) the API's alerts and an amtool line that
    lists them."""
    base = f"http://127.0.0.1:{port}"
    root = requests.get(f"{base}/", timeout=10).text
    if vigil_stack.NO_WEB_UI in " ".join(root.split()):
        assert url == f"{base}/api/v2/alerts", url
        names = [alert["labels"]["alertname"] for alert in requests.get(url, timeout=10).json()]
        command = f"amtool alert query --alertmanager.url={base}"
        assert re.search(rf"^ {{16}}{re.escape(command)}$", banner, re.M), banner
        if AMTOOL is not None:
            listed = subprocess.run(
                [AMTOOL, *command.split()[1:]], capture_output=True, text=True, timeout=60
            )
            assert listed.returncode == 0, listed.stdout + listed.stderr
            assert all(name in listed.stdout for name in names), (names, listed.stdout)
    else:
        assert url == f"{base}/#/alerts", url
        assert '<script src="script.js">' in root, root[:2000]  # the web UI's application
        assert requests.get(f"{base}/script.js", timeout=10).status_code == 200
        names = alertmanager_alerts(port)
    if HAS_PROMETHEUS:
        assert "Watchdog" in names, names


def _descendants_alive(pids: list[int]) -> list[str]:
    """The pids among ``pids`` still running (a zombie waiting for its reaper is not)."""
    alive = []
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
            alive.append(f"{pid} ({' '.join(netproc.cmdline(pid) or [])})")
    return alive


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_killed_stack_leaves_no_part_running(tmp_path, demo_dir):
    """SIGKILL (what the OOM killer sends) gives the stack no chance to stop its parts: the
    kernel ends them (PR_SET_PDEATHSIG), and their ports are free for the next start."""
    ports = free_ports()
    out = tmp_path / "stack.out"
    stack = start_stack(
        out, "--run-dir", str(tmp_path / "run"), *port_args(ports), "--", "--demo-dir", demo_dir
    )
    try:
        _wait(
            lambda: _ok(f"http://127.0.0.1:{ports['inference']}/ready"),
            120,
            "the inference process",
            stack,
            out,
        )
        text = out.read_text()
        started = [name for name in ports if f"  {name:<13} http://" in text]
        _wait(
            lambda: all(not is_free(ports[name]) for name in started),
            60,
            f"every part listening ({', '.join(started)})",
            stack,
            out,
        )
        children = netproc.children(stack.pid)
        assert len(children) == len(started), (started, children)
    finally:
        stack.kill()
        stack.wait(10)
    deadline = time.monotonic() + 30
    while (alive := _descendants_alive(children)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive, f"still running after the stack was killed: {alive}"
    deadline = time.monotonic() + 30
    while (busy := [n for n, p in ports.items() if not is_free(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not busy, f"ports still held after the stack was killed: {busy}"


def test_a_part_has_its_own_process_group_and_dies_with_its_parent(tmp_path):
    """What every part gets (Popen's process_group=0, prctl in preexec_fn), as the part itself
    sees it: SIGKILL as its parent-death signal (PR_GET_PDEATHSIG), a group of its own."""
    code = (
        "import ctypes, os; signal = ctypes.c_int(); "
        "ctypes.CDLL(None, use_errno=True).prctl(2, ctypes.byref(signal), 0, 0, 0); "
        "print(signal.value, os.getpgid(0) == os.getpid())"
    )
    part = Part("probe", [sys.executable, "-c", code], tmp_path / "probe.log")
    part.start(tmp_path)
    try:
        assert part.process.wait(60) == 0
    finally:
        part.stop()
    expected = [str(int(signal.SIGKILL)), "True"] if sys.platform.startswith("linux") else None
    assert (tmp_path / "probe.log").read_text().split() == expected


def _alert(index: int) -> dict:
    """A notification for the notifier's /alerts, its console line over a kilobyte long."""
    return {
        "version": "4",
        "groupKey": '{}:{alertname="DeadConsole"}',
        "truncatedAlerts": 0,
        "status": "firing",
        "receiver": "webhook",
        "groupLabels": {"alertname": "DeadConsole"},
        "commonLabels": {"alertname": "DeadConsole"},
        "commonAnnotations": {},
        "externalURL": "http://127.0.0.1:9093",
        "alerts": [
            {
                "status": "firing",
                "labels": {"alertname": "DeadConsole", "severity": "warning"},
                "annotations": {"summary": f"line {index:04d} " + "x" * 1000},
                "startsAt": "2026-11-30T01:00:00.000Z",
                "endsAt": "0001-01-01T00:00:00Z",
                "generatorURL": "http://127.0.0.1:9090/graph",
                "fingerprint": f"{index:016x}",
            }
        ],
    }


@pytest.mark.skipif(
    not (HAS_ALERTMANAGER and HAS_NOTIFIER), reason="the notifier starts only with Alertmanager"
)
def test_a_console_that_goes_away_stops_no_notification(tmp_path):
    """The stack's standard output is a pipe whose reader goes away once the banner is out (a
    `scripts/stack | tee` whose tee died, say). The stack keeps reading the notifier's output:
    its console lines keep reaching its log, far past what the pipe from it could hold
    (64 KiB), the notifier never finds that pipe closed or full, its log says once that the
    console is gone, and the stack runs on and stops cleanly, its standard error empty."""
    ports = free_ports()
    engine = f"http://127.0.0.1:{ports.pop('inference')}"  # nothing listens there
    run = tmp_path / "run"
    errors = tmp_path / "stack.err"
    notifier = f"http://127.0.0.1:{ports['notifier']}"
    log = run / "logs" / "notifier.log"
    with open(errors, "wb") as err:
        stack = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vigil.stack",
                "--engine",
                "vigil",
                "--engine-url",
                engine,
                "--run-dir",
                str(run),
                *port_args(ports),
                "--stop-after",
                "180",  # a bound: the test stops it with Ctrl-C
            ],
            stdout=subprocess.PIPE,
            stderr=err,
            cwd=REPO,
        )
    try:
        seen = b""
        deadline = time.monotonic() + 60
        while b"Ctrl-C stops everything." not in seen and time.monotonic() < deadline:
            readable, _, _ = select.select([stack.stdout], [], [], 1)
            if readable and not (chunk := os.read(stack.stdout.fileno(), 65536)):
                break
            seen += chunk if readable else b""
        assert b"Ctrl-C stops everything." in seen, seen.decode() + errors.read_text()
        stack.stdout.close()  # the console goes away
        _wait(lambda: _ok(f"{notifier}/health"), 60, "the notifier", stack, errors)
        session = requests.Session()
        for index in range(150):  # some 160 KB of console lines
            response = session.post(f"{notifier}/alerts", json=_alert(index), timeout=10)
            assert response.status_code == 200, (index, response.text)
        assert session.get(f"{notifier}/health", timeout=10).status_code == 200
        # The console lines themselves (the JSON log on stderr has the summaries too).
        console_line = "FIRING [warning] DeadConsole: line {:04d} "
        _wait(
            lambda: console_line.format(149) in log.read_text(errors="replace"),
            30,
            "the notifier's last console line in its log",
            stack,
            errors,
        )
        text = log.read_text(errors="replace")
        assert all(console_line.format(index) in text for index in range(150))
        gone = re.findall(
            r"^vigil\.stack: the stack's console cannot be written \((.*?)\)", text, re.M
        )
        assert gone == ["BrokenPipeError: [Errno 32] Broken pipe"], gone
        # The pipe from the notifier kept being read: it never found its stdout closed or full.
        assert "cannot print the notifications on stdout" not in text
        assert "console lines are being dropped" not in text
        assert stack.poll() is None, errors.read_text()
    finally:
        stack.send_signal(signal.SIGINT)
        code = stack.wait(60)
    assert code == 0, errors.read_text()
    assert errors.read_text() == "", errors.read_text()
    assert [name for name, port in ports.items() if not is_free(port)] == []


def test_a_busy_port_stops_the_start_with_one_line_naming_its_holder(tmp_path):
    """This test's own process holds the exporter's port: the stack says so in one line, with
    the holder's pid and whole command line, exits with 1, and leaves nothing running."""
    ports = free_ports()
    run = tmp_path / "run"
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", ports["exporter"]))
        holder.listen()
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "vigil.stack",
                "--run-dir",
                str(run),
                *port_args(ports),
                "--stop-after",
                "60",
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=120,
        )
        ours = netproc.one_line(netproc.cmdline(os.getpid()))
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.splitlines() == [
        f"llm-vigil stack: not started: port {ports['exporter']} (exporter, --exporter-port) is "
        f"in use by pid {os.getpid()} ({ours}): stop it, or choose another port with "
        "--exporter-port"
    ], result.stderr
    assert "Ctrl-C" not in result.stdout and not (run / "logs" / "exporter.log").exists()
    assert [name for name, port in ports.items() if not is_free(port)] == []


def test_a_part_that_exits_at_start_shows_the_end_of_its_log_on_the_console(tmp_path, demo_dir):
    """An inference argument it refuses: the reason is on the console (the end of its log),
    not only in the log file, at every restart."""
    ports = free_ports()
    out = tmp_path / "stack.out"
    stack = start_stack(
        out,
        "--run-dir",
        str(tmp_path / "run"),
        *port_args(ports),
        "--stop-after",
        "60",
        "--",
        "--demo-dir",
        demo_dir,
        "--no-such-option",
    )
    try:
        _wait(
            lambda: "inference | " in out.read_text() and "restarting in" in out.read_text(),
            60,
            "the inference process's exit",
            stack,
            out,
        )
        text = out.read_text()
        assert "inference exited with status 2; restarting in 1 s" in text, text
        assert f"the last lines of {tmp_path / 'run' / 'logs' / 'inference.log'}:" in text
        assert re.search(r"^  inference \| .*--no-such-option", text, re.M), text
    finally:
        stack.send_signal(signal.SIGINT)
        stack.wait(60)


# --- ports and the configurations written for them -----------------------------------------


def _args(**overrides) -> argparse.Namespace:
    values = {
        "engine": None,
        "engine_url": None,
        "model": "demo",
        "device": "auto",
        "inference_args": [],
        **{f"{name}_port": None for name in vigil_stack.DEFAULT_PORTS},
    }
    values.update(overrides)
    return argparse.Namespace(**values)


def _option(part, flag: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in part.command if a.startswith(f"{flag}=")]
    return value


def test_the_default_ports_use_the_shipped_configurations(tmp_path):
    parts, _ = vigil_stack.plan(_args(), tmp_path)
    by_name = {part.name: part for part in parts}
    assert not (tmp_path / "prometheus.yml").exists()
    assert not (tmp_path / "alertmanager.yml").exists()
    if "prometheus" in by_name:
        assert _option(by_name["prometheus"], "--config.file") == str(ALERTS / "prometheus.yml")
        delay = _option(by_name["prometheus"], "--rules.alert.resend-delay")
        assert delay == vigil_stack.RESEND_DELAY
    if "alertmanager" in by_name:
        assert _option(by_name["alertmanager"], "--config.file") == str(ALERTS / "alertmanager.yml")
    assert {part.name: part.port for part in parts} == {
        name: port for name, port in vigil_stack.DEFAULT_PORTS.items() if name in by_name
    }


def test_other_ports_write_configurations_that_follow_them(tmp_path):
    """Prometheus scrapes the exporter, itself and Alertmanager where they are and sends to that
    Alertmanager; Alertmanager's webhooks reach the notifier's port and its templates resolve
    from the run directory (amtool check-config); the exporter probes the inference port."""
    ports = {"inference": 18001, "exporter": 19401, "prometheus": 19091}
    ports |= {"alertmanager": 19094, "notifier": 15002}
    parts, _ = vigil_stack.plan(_args(**{f"{n}_port": p for n, p in ports.items()}), tmp_path)
    by_name = {part.name: part for part in parts}
    exporter = by_name["exporter"].command
    assert exporter[exporter.index("--target") + 1] == "http://127.0.0.1:18001"
    assert exporter[exporter.index("--port") + 1] == "19401"
    if "inference" in by_name:
        command = by_name["inference"].command
        assert command[command.index("--port") + 1] == "18001"

    prometheus_yml = tmp_path / "prometheus.yml"
    config = yaml.safe_load(prometheus_yml.read_text(encoding="utf-8"))
    targets = {
        job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
        for job in config["scrape_configs"]
    }
    assert targets == {
        "vigil-exporter": ["127.0.0.1:19401"],
        "vigil-exporter-hang": ["127.0.0.1:19401"],
        "prometheus": ["127.0.0.1:19091"],
        "alertmanager": ["127.0.0.1:19094"],
    }
    assert config["alerting"]["alertmanagers"] == [
        {"static_configs": [{"targets": ["127.0.0.1:19094"]}]}
    ]
    assert config["rule_files"] == [str(ALERTS / "*.rules.yml")]
    _promtool_check(prometheus_yml)

    alertmanager_yml = tmp_path / "alertmanager.yml"
    config = yaml.safe_load(alertmanager_yml.read_text(encoding="utf-8"))
    shipped = yaml.safe_load((ALERTS / "alertmanager.yml").read_text(encoding="utf-8"))
    urls = [
        hook["url"]
        for receiver in config["receivers"]
        for hook in receiver.get("webhook_configs", [])
    ]
    assert urls and all(url.startswith("http://127.0.0.1:15002/") for url in urls), urls
    assert len(urls) == len([h for r in shipped["receivers"] for h in r.get("webhook_configs", [])])
    assert config["templates"] == [str(ALERTS / t) for t in shipped["templates"]]
    assert config["route"] == shipped["route"]
    if "alertmanager" in by_name:
        assert _option(by_name["alertmanager"], "--config.file") == str(alertmanager_yml)
        assert _option(by_name["alertmanager"], "--web.listen-address") == "127.0.0.1:19094"
    if "prometheus" in by_name:
        assert _option(by_name["prometheus"], "--config.file") == str(prometheus_yml)
    if AMTOOL is None:
        pytest.skip("amtool is not installed (Debian: prometheus-alertmanager)")
    result = subprocess.run(
        [AMTOOL, "check-config", str(alertmanager_yml)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,  # not alerts/: the templates must resolve by the file's own paths
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert " - 1 templates" in result.stdout and "SUCCESS" in result.stdout, result.stdout


def test_without_the_notifier_the_stack_says_so_and_starts_the_rest(tmp_path, monkeypatch):
    monkeypatch.setattr(vigil_stack, "notifier_missing", lambda: "notifier: not here")
    parts, missing = vigil_stack.plan(_args(), tmp_path)
    assert "notifier" not in [part.name for part in parts]
    assert "notifier: not here" in missing


def test_without_alertmanager_the_notifier_is_not_started_either(tmp_path, monkeypatch):
    """The notifier hears only from Alertmanager: started without it, its dead man's switch
    would report the pipeline broken after 180 s and every hour, of an Alertmanager the banner
    already says is skipped."""
    real = vigil_stack._binary
    monkeypatch.setattr(
        vigil_stack,
        "_binary",
        lambda *names: None if "prometheus-alertmanager" in names else real(*names),
    )
    parts, missing = vigil_stack.plan(_args(), tmp_path)
    names = [part.name for part in parts]
    assert "notifier" not in names and "alertmanager" not in names
    assert "exporter" in names
    expected = "notifier: not started without Alertmanager, whose notifications it receives"
    assert expected in missing, missing
    assert any(line.startswith("alertmanager: not installed") for line in missing), missing


# --- the resend delay: the Watchdog soon after a start, alerts valid across a restart --------


def _seconds(duration: str) -> int:
    value, unit = re.fullmatch(r"(\d+)([sm])", duration).groups()
    return int(value) * (60 if unit == "m" else 1)


def test_the_resend_delay_brings_the_watchdog_soon_and_keeps_alerts_across_a_restart():
    """The arithmetic of RESEND_DELAY's comment, on the shipped evaluation interval, as
    Prometheus does it (rules/alerting.go): an alert is sent again at the first evaluation
    strictly later than its last send plus the delay (Alert.needsSending), and each send is
    valid at Alertmanager for 4 x max(interval, delay) (AlertingRule.sendAlerts). The
    Watchdog's first send, at the first evaluation (one interval after the start at most), may
    be dropped before Alertmanager is discovered; so may the first send after a restart."""
    config = yaml.safe_load((ALERTS / "prometheus.yml").read_text(encoding="utf-8"))
    interval = _seconds(config["global"]["evaluation_interval"])
    delay = _seconds(vigil_stack.RESEND_DELAY)
    resent_after = (delay // interval + 1) * interval
    valid_for = 4 * max(interval, delay)
    assert (interval, delay, resent_after, valid_for) == (10, 25, 30, 100)
    assert interval + resent_after <= 40, "the Watchdog well within a minute of a start"
    # The worst case across a restart: the last send a whole resend period before Prometheus
    # stopped; after the restart, the first evaluation an interval late and its send dropped.
    restart_tolerated = valid_for - (resent_after + interval + resent_after)
    assert restart_tolerated >= 30, "a Prometheus restart of 30 s resolves no alert"
    # What 10s (the value before) gave: a restart of no length at all could resolve them.
    assert 4 * 10 - (20 + interval + 20) < 0


# --- Alertmanager's page: its web UI's, or the API's where the UI is missing ---------------


class _Page(BaseHTTPRequestHandler):
    body = b""

    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


class _Running:
    def __init__(self, code=None):
        self.code = code

    def poll(self):
        return self.code


@pytest.mark.parametrize(
    "body, has_ui",
    [
        # Debian's /usr/share/prometheus/alertmanager/no-ui/index.html, its line break kept.
        (
            b"<h1>Alertmanager</h1>\n<p>The Debian package of the alertmanager does not "
            b"include a web\n        application.</p>",
            False,
        ),
        (b'<title>Alertmanager</title></head><body><script src="script.js"></script>', True),
    ],
)
def test_the_alertmanager_page_is_the_ui_where_there_is_one_else_the_api(body, has_ui, tmp_path):
    handler = type("Page", (_Page,), {"body": body})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        part = Part("alertmanager", [], tmp_path / "log", process=_Running())
        assert vigil_stack.alertmanager_has_ui(url, part) is has_ui
    finally:
        server.shutdown()
        server.server_close()
    pages, notes = vigil_stack.alertmanager_pages(url, has_ui)
    if has_ui:
        assert (pages, notes) == ([("alerts", f"{url}/#/alerts")], [])
    else:
        assert pages == [("alerts as JSON", f"{url}/api/v2/alerts")]
        assert notes[-1] == f"amtool alert query --alertmanager.url={url}"


def test_an_alertmanager_that_never_answers_keeps_the_ui_page(tmp_path):
    """Nothing listens (and the process has exited): no wait, and the page of Alertmanager's
    own builds."""
    port = free_ports(("alertmanager",))["alertmanager"]
    url = f"http://127.0.0.1:{port}"
    part = Part("alertmanager", [], tmp_path / "log", process=_Running(1))
    assert vigil_stack.alertmanager_has_ui(url, part, wait=30) is None
    assert vigil_stack.alertmanager_pages(url, None) == ([("alerts", f"{url}/#/alerts")], [])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--exporter-port", "0"], "--exporter-port: must be a TCP port from 1 to 65535"),
        (["--notifier-port", "http"], "--notifier-port: must be a TCP port from 1 to 65535"),
        (["--prometheus-port", "9400"], "--exporter-port and --prometheus-port are both 9400"),
        (
            ["--engine", "vllm", "--engine-url", "http://127.0.0.1:8000", "--inference-port", "1"],
            "--inference-port: for our inference process",
        ),
    ],
)
def test_port_options_are_checked_before_anything_starts(argv, message, tmp_path, capsys):
    _refused_before_anything_starts(argv, message, tmp_path, capsys)


def _refused_before_anything_starts(argv, message, tmp_path, capsys) -> None:
    """Exit 2 with ``message`` on stderr, as argparse does, and nothing started or written."""
    with pytest.raises(SystemExit) as exit_info:
        vigil_stack.main([*argv, "--run-dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists(), "nothing may be started or written"


def test_the_port_check_binds_as_the_servers_do():
    """The stack's check and every server bind with vigil.listen.bind_tcp: a port another
    socket listens on is refused, one whose last connection lingers in TIME_WAIT is taken
    (SO_REUSEADDR), so the check finds a port free exactly when the servers can take it."""
    from vigil.listen import bind_tcp

    def server_binds(port: int) -> bool:
        try:
            bind_tcp("127.0.0.1", port).close()
        except OSError as exc:
            assert exc.errno == errno.EADDRINUSE
            return False
        return True

    with socket.socket() as listener:
        # As our servers and Go's do; a socket without it blocks the port even in TIME_WAIT.
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert not server_binds(port) and not is_free(port)
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
    accepted.close()  # the server's side closes first: its end waits in TIME_WAIT
    client.close()
    deadline = time.monotonic() + 10
    while "06" not in _states(port) and time.monotonic() < deadline:  # 06: TCP_TIME_WAIT
        time.sleep(0.05)
    assert "06" in _states(port)
    assert server_binds(port) and is_free(port)


def _taken(port: int) -> str:
    """What holds a port: its sockets' lines in /proc/net/tcp, and the listener."""
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    mine = [
        " ".join(f[1:4] + f[7:10]) for f in map(str.split, lines) if f[1].endswith(f":{port:04X}")
    ]
    return f"{mine}, listener {netproc.listener_of(port)}"


def _states(port: int) -> set[str]:
    """The states (/proc/net/tcp's st column) of the sockets on local port ``port``."""
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return {f[3] for f in map(str.split, lines) if int(f[1].rsplit(":", 1)[1], 16) == port}


# --- watching an engine that runs already (--engine, --engine-url) -------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--engine", "vllm"], "--engine vllm needs --engine-url"),
        (["--engine-url", "http://127.0.0.1:8000"], "--engine-url needs --engine"),
        (["--engine", "lmdeploy", "--engine-url", "http://127.0.0.1:8000"], "invalid choice"),
        (["--engine", "vllm", "--engine-url", "127.0.0.1:8000"], "--engine-url '127.0.0.1:8000' "),
        (
            ["--engine", "sglang", "--engine-url", "http://127.0.0.1:30000", "--model", "x"],
            "--model: for our inference process",
        ),
        (
            ["--engine", "tgi", "--engine-url", "http://127.0.0.1:3000", "--", "--port", "1"],
            "arguments after --: for our inference process",
        ),
    ],
)
def test_engine_arguments_are_checked_before_anything_starts(argv, message, tmp_path, capsys):
    _refused_before_anything_starts(argv, message, tmp_path, capsys)


@pytest.mark.parametrize(
    "url, address, extra",
    [
        ("http://127.0.0.1:8000", "127.0.0.1:8000", {}),
        ("http://gpu-node:30000/", "gpu-node:30000", {}),
        ("https://vllm.internal", "vllm.internal:443", {"scheme": "https"}),
        ("http://[::1]:8000/engine", "[::1]:8000", {"metrics_path": "/engine/metrics"}),
    ],
)
def test_the_engine_scrape_job_is_named_after_the_engine(url, address, extra):
    job = vigil_stack.engine_scrape_job("vllm", url)
    assert job == {"job_name": "vllm", **extra, "static_configs": [{"targets": [address]}]}


def test_an_engine_without_hang_series_gets_no_fast_job():
    """--engine vigil: our process's own /metrics; the hang rules read ours from the exporter."""
    assert "vigil" not in HANG_SERIES
    assert vigil_stack.engine_scrape_jobs("vigil", "http://127.0.0.1:8000") == [
        vigil_stack.engine_scrape_job("vigil", "http://127.0.0.1:8000")
    ]


def test_a_hang_series_that_is_no_metric_name_is_refused(monkeypatch):
    """The names go into a relabel regex unescaped: anything else would match other series."""
    monkeypatch.setitem(HANG_SERIES, "tgi", ("tgi_queue_size", "tgi_.*"))
    with pytest.raises(ValueError, match="tgi_"):
        vigil_stack.engine_scrape_jobs("tgi", "http://127.0.0.1:3000")


def test_the_plan_for_an_engine_starts_no_inference_and_writes_its_own_prometheus_config(
    tmp_path,
):
    args = argparse.Namespace(
        engine="sglang", engine_url="http://127.0.0.1:30000", model="demo", device="auto"
    )
    parts, missing = vigil_stack.plan(args, tmp_path)
    names = [part.name for part in parts]
    assert "inference" not in names and not any("inference" in line for line in missing)
    (exporter,) = [part for part in parts if part.name == "exporter"]
    target = exporter.command[exporter.command.index("--target") + 1]
    assert target == "sglang=http://127.0.0.1:30000"
    written = tmp_path / "prometheus.yml"
    config = yaml.safe_load(written.read_text(encoding="utf-8"))
    shipped = yaml.safe_load((ALERTS / "prometheus.yml").read_text(encoding="utf-8"))
    assert config["rule_files"] == [str(ALERTS / "*.rules.yml")]
    assert config["scrape_configs"][:-2] == shipped["scrape_configs"]
    # The engine's job, and its hang series every 2 s in a job of their own (kept from the whole
    # /metrics: SGLang's does not filter by name[]), dropped from the first.
    names = "|".join(sorted(HANG_SERIES["sglang"]))
    assert config["scrape_configs"][-2:] == [
        {
            "job_name": "sglang",
            "static_configs": [{"targets": ["127.0.0.1:30000"]}],
            "metric_relabel_configs": [
                {"source_labels": ["__name__"], "regex": names, "action": "drop"}
            ],
        },
        {
            "job_name": "sglang-hang",
            "scrape_interval": "2s",
            "scrape_timeout": "1500ms",
            "static_configs": [{"targets": ["127.0.0.1:30000"]}],
            "metric_relabel_configs": [
                {"source_labels": ["__name__"], "regex": names, "action": "keep"},
                {"target_label": "job", "replacement": "sglang"},
            ],
        },
    ]
    assert {k: v for k, v in config.items() if k not in ("rule_files", "scrape_configs")} == {
        k: v for k, v in shipped.items() if k not in ("rule_files", "scrape_configs")
    }
    if "prometheus" in names:
        (prometheus,) = [part for part in parts if part.name == "prometheus"]
        assert f"--config.file={written}" in prometheus.command
    assert (ALERTS / "prometheus.yml").read_text(encoding="utf-8") == (
        ALERTS / "prometheus.yml"
    ).read_text(encoding="utf-8")


def _promtool_check(config: Path) -> None:
    if PROMTOOL is None:
        return
    result = subprocess.run(
        [PROMTOOL, "check", "config", str(config)], capture_output=True, text=True, timeout=120
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    expected = len(list(ALERTS.glob("*.rules.yml")))
    assert f"SUCCESS: {expected} rule files found" in output, output


def _samples(text: str, name: str) -> list:
    return [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]


def _children(pid: int) -> list[str]:
    """The command lines of a process's children (Linux /proc)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    lines = []
    for child in children:
        try:
            raw = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        lines.append(raw.replace(b"\0", b" ").decode(errors="replace"))
    return lines


def test_the_stack_watches_a_running_engine_instead_of_starting_ours(tmp_path, demo_dir):
    """Our own inference server, started by the test on a free port, is the foreign engine:
    --engine vigil --engine-url URL. The stack starts no inference process, the generated
    Prometheus configuration passes promtool, the exporter probes the engine and finds its
    processes from its port, and Prometheus scrapes the engine as job "vigil"."""
    ports = free_ports(("exporter", "prometheus", "alertmanager", "notifier"))
    (tmp_path / "engine").mkdir()
    engine = start_server(tmp_path / "engine", demo_dir)
    url = engine.base_url
    run = tmp_path / "run"
    out = tmp_path / "stack.out"
    try:
        with open(out, "wb") as log:
            stack = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "vigil.stack",
                    "--engine",
                    "vigil",
                    "--engine-url",
                    url,
                    "--run-dir",
                    str(run),
                    *port_args(ports),
                    "--stop-after",
                    "120",  # a bound: the test stops it with Ctrl-C once it has seen enough
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )
        try:
            _wait(lambda: "Ctrl-C stops" in out.read_text(), 30, "the stack", stack, out)
            text = out.read_text()
            assert f"watching      vigil at {url} (running already" in text, text
            assert f"{url}/metrics answers with vigil's metrics" in text, text
            assert "  inference " not in text and "skipped: inference" not in text, text
            assert not (run / "logs" / "inference.log").exists()
            assert not [c for c in _children(stack.pid) if " -m inference" in c]

            config_path = run / "prometheus.yml"
            config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
            (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "vigil"]
            assert job["static_configs"] == [{"targets": [url.split("://", 1)[1]]}]
            _promtool_check(config_path)

            def exporter_probes() -> bool:
                text = requests.get(f"http://127.0.0.1:{ports['exporter']}/metrics", timeout=2).text
                health = [
                    s
                    for s in _samples(text, "vigil_probe_success")
                    if s.labels == {"target": url, "check": "health"}
                ]
                info = [
                    s for s in _samples(text, "vigil_target_info") if s.labels.get("target") == url
                ]
                found = [
                    s
                    for s in _samples(text, "vigil_engine_processes")
                    if s.labels.get("target") == url
                ]
                return (
                    [s.value for s in health] == [1.0]
                    and [(s.labels["engine"], s.labels["source"]) for s in info]
                    == [("vigil", "configured")]
                    and bool(found)
                    and found[0].value >= 1
                )

            _wait(exporter_probes, 60, "the exporter probing the engine", stack, out)
            if HAS_PROMETHEUS:

                def engine_up() -> bool:
                    result = requests.get(
                        f"http://127.0.0.1:{ports['prometheus']}/api/v1/query",
                        params={"query": 'up{job="vigil"}'},
                        timeout=2,
                    ).json()["data"]["result"]
                    return [r["value"][1] for r in result] == ["1"]

                _wait(engine_up, 60, 'Prometheus scraping the engine as job "vigil"', stack, out)
        finally:
            stack.send_signal(signal.SIGINT)
            code = stack.wait(60)
        assert code == 0, out.read_text()[-3000:]
        assert "stopped" in out.read_text()
        assert engine.process.poll() is None, "the stack must leave the engine it watches alone"
    finally:
        engine.stop()


# --- installing Prometheus and Alertmanager starts no service of theirs (scripts/lib/venv.sh) --


class _Install:
    """ensure_promtool as root with a fake PATH: apt-get, id and systemctl are scripts that
    record what they are asked; apt-get's install asks policy-rc.d for each package as the
    packages' maintainer scripts do (invoke-rc.d, deb-systemd-invoke) and records the answer
    (101: forbidden by policy). The policy-rc.d and the systemd run directory are the test's."""

    def __init__(self, tmp_path: Path, *, install_status: int = 0, install_waits: bool = False):
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        self.record = tmp_path / "record"
        self.policy = tmp_path / "policy-rc.d"
        self.systemd = tmp_path / "run-systemd-system"
        self.installing = tmp_path / "installing"
        self._tool("id", "echo 0")
        self._tool(
            "apt-get",
            f"""echo "apt-get $*" >> {self.record}
[ "$1" = update ] && exit 0
for package in "$@"; do
  case "$package" in -*|install) continue ;; esac
  if [ -x {self.policy} ]; then
    {self.policy} "$package" start; echo "policy-rc.d $package start: $?" >> {self.record}
  else
    echo "$package: no policy-rc.d, started" >> {self.record}
  fi
done
touch {self.installing}
{"sleep 60" if install_waits else ""}
exit {install_status}""",
        )
        self._tool(
            "systemctl",
            f"""echo "systemctl $*" >> {self.record}
case "$1" in is-enabled) exit 0 ;; is-active) exit 3 ;; esac""",
        )
        for name in ("rm", "chmod", "touch", "sleep"):
            (self.bin / name).symlink_to(shutil.which(name))

    def _tool(self, name: str, body: str) -> None:
        path = self.bin / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)

    def command(self) -> list[str]:
        script = (
            f"source scripts/lib/venv.sh && _POLICY_RC_D={self.policy} "
            f"&& _SYSTEMD_RUNNING={self.systemd} && ensure_promtool LOST && echo carried on"
        )
        return ["/bin/bash", "-c", script]

    def run(self) -> subprocess.CompletedProcess:
        return subprocess.run(
            self.command(),
            cwd=REPO,
            env={"PATH": str(self.bin)},
            capture_output=True,
            text=True,
            timeout=60,
        )

    def lines(self) -> list[str]:
        return self.record.read_text().splitlines() if self.record.exists() else []


_DENIED = [
    "policy-rc.d prometheus start: 101",
    "policy-rc.d prometheus-alertmanager start: 101",
]


def test_installing_the_packages_starts_no_service_without_systemd(tmp_path):
    """No policy-rc.d and no systemd (a container without one): invoke-rc.d would start
    Prometheus on :9090 and Alertmanager on :9093; a policy-rc.d that answers 101 is there
    for the install alone."""
    install = _Install(tmp_path)
    result = install.run()
    assert result.returncode == 0, result.stderr
    lines = install.lines()
    assert lines[0] == "apt-get update -qq"
    assert lines[1].startswith("apt-get install -y -qq --no-install-recommends prometheus ")
    assert lines[2:] == _DENIED, lines
    assert not install.policy.exists(), "the policy-rc.d written for the install is removed"
    assert "installing prometheus prometheus-alertmanager with apt-get" in result.stderr
    assert "could not install" not in result.stderr and "carried on" in result.stdout


def test_an_administrators_policy_rc_d_is_left_as_it_is(tmp_path):
    install = _Install(tmp_path)
    theirs = "#!/bin/sh\n# the administrator's\nexit 101\n"
    install.policy.write_text(theirs)
    install.policy.chmod(0o755)
    result = install.run()
    assert result.returncode == 0, result.stderr
    assert install.lines()[2:] == _DENIED
    assert install.policy.read_text() == theirs


def test_where_systemd_runs_the_services_are_disabled_for_the_next_boot(tmp_path):
    """deb-systemd-invoke heeds policy-rc.d too, but deb-systemd-helper still enables the
    units: disabled, said."""
    install = _Install(tmp_path)
    install.systemd.mkdir()
    result = install.run()
    assert result.returncode == 0, result.stderr
    lines = install.lines()
    assert lines[2:4] == _DENIED
    assert "systemctl disable --now --quiet prometheus" in lines
    assert "systemctl disable --now --quiet prometheus-alertmanager" in lines
    assert "note: disabled prometheus.service, which installing the package enabled" in (
        result.stderr
    )


def test_without_systemd_systemctl_is_left_alone(tmp_path):
    install = _Install(tmp_path)
    assert install.run().returncode == 0
    assert not [line for line in install.lines() if line.startswith("systemctl")]


def test_a_failed_install_removes_the_policy_rc_d_and_says_so(tmp_path):
    install = _Install(tmp_path, install_status=100)
    result = install.run()
    assert result.returncode == 0, result.stderr
    assert not install.policy.exists()
    assert "note: apt-get could not install prometheus prometheus-alertmanager; LOST" in (
        result.stderr
    )


def test_ctrl_c_during_the_install_removes_the_policy_rc_d_and_stops_the_script(tmp_path):
    """A policy-rc.d left behind would keep every later install from starting its services."""
    install = _Install(tmp_path, install_waits=True)
    with open(tmp_path / "out", "wb") as out:
        script = subprocess.Popen(
            install.command(),
            cwd=REPO,
            env={"PATH": str(install.bin)},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, as a terminal's Ctrl-C reaches it
        )
    try:
        deadline = time.monotonic() + 30
        while not install.installing.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert install.installing.exists() and install.policy.exists()
        os.killpg(script.pid, signal.SIGINT)
        code = script.wait(30)
    finally:
        if script.poll() is None:
            os.killpg(script.pid, signal.SIGKILL)
            script.wait(10)
    output = (tmp_path / "out").read_text()
    assert code == -signal.SIGINT, output
    assert not install.policy.exists()
    assert "carried on" not in output and "could not install" not in output, output
