"""Detection latency of the any-engine hang alert (InferenceEngineNoProgress) with the shipped
defaults: from the start of a hang to the notification at the receiver.

The engine is this project's inference process on the demo model, watched as a foreign engine is:
Prometheus scrapes its own /metrics (a job of its own, as for vLLM), the exporter probes it and
does not share its state directory, and its watchdog is kept out of the way (--stall-timeout and
--stall-floor 3600), as an engine without one. Each round arms a decode hang that never ends, sends
one completion, and times the InferenceEngineNoProgress notification. The shipped files are used as
they are: scrape and evaluation every 10 s (the hang series and the fast hang group every 2 s,
whose InferenceEngineStoppedGenerating may arrive first after steady traffic), the progress rate
over 1 m, the alert's for of 1 m (engine_hang_for), Alertmanager's critical group_wait.

Two cases: the hang is the first work of an idle engine (the default: the alert then waits for
work to have been pending for engine_pending_window, 2 m), or, with ``--busy``, it comes after
``--busy-seconds`` of back-to-back completions (steady traffic, the engine seen making progress).

Run: ``.venv/bin/python bench/engine_hang_latency.py [--rounds 3] [--busy]`` (3 to 5 minutes a
round).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

from alert_latency import configs  # noqa: E402
from conftest import (  # noqa: E402
    WebhookReceiver,
    start_alertmanager,
    start_exporter,
    start_prometheus,
    start_server,
)


def _job(name: str, url: str) -> dict:
    return {"job_name": name, "static_configs": [{"targets": [url.removeprefix("http://")]}]}


def _traffic(server, stop: threading.Event) -> None:
    """Back-to-back completions until told to stop (the last one meets the hang and waits)."""
    while not stop.is_set():
        try:
            requests.post(
                server.url("/v1/completions"),
                timeout=600,
                json={"model": "demo", "prompt": "busy", "max_tokens": 32},
            )
        except requests.RequestException:
            return


def one_round(demo_dir: str, workdir: Path, busy_seconds: float, settle: float) -> float:
    rules_dir = workdir / "rules"
    rules_dir.mkdir()
    receiver = WebhookReceiver()
    am_text, intervals = configs("defaults", receiver.url, rules_dir)
    (workdir / "engine").mkdir()
    server = start_server(
        workdir / "engine",
        demo_dir,
        "--enable-fault-injection",
        "--stall-timeout",
        "3600",
        "--stall-floor",  # the floor applies once a step has a prediction: out of the way too
        "3600",
        "--on-stall",
        "report",
    )
    target = f"vigil={server.base_url}"  # its state directory is not shared: a foreign engine
    exporter = start_exporter(
        workdir, workdir / "exporter-state", "--target", target, "--gpu-backend", "none"
    )
    manager = start_alertmanager(workdir, am_text)
    alertmanagers = [{"static_configs": [{"targets": [manager.base_url.removeprefix("http://")]}]}]
    prometheus = start_prometheus(
        workdir,
        yaml.safe_dump(
            {
                "global": intervals,
                "rule_files": [str(rules_dir / "*.rules.yml")],
                "alerting": {"alertmanagers": alertmanagers},
                "scrape_configs": [
                    _job("vigil-exporter", exporter.base_url),
                    _job("vigil", server.base_url),
                ],
            }
        ),
        "--rules.alert.resend-delay=1s",
    )
    try:
        receiver.wait_for("Watchdog", timeout=120)
        # Prometheus's history before the hang: the rule's windows (1 m) must see the engine
        # idle (or busy) first, as they would on a Prometheus that has run for a while.
        time.sleep(settle)
        stop = threading.Event()
        if busy_seconds:
            threading.Thread(target=_traffic, args=(server, stop), daemon=True).start()
            time.sleep(busy_seconds)
        started = server.hang_a_request()
        stop.set()
        fired = receiver.wait_for("InferenceEngineNoProgress", timeout=420, after=started)
        assert fired["labels"]["engine"] == "vigil", fired["labels"]
        # From Prometheus's own view of the engine, or (with a target label) the exporter's.
        print(f"  fired with {sorted(fired['labels'].items())}", flush=True)
        return fired["received_at"] - started
    finally:
        for part in (prometheus, manager, exporter, server):
            part.stop()
        receiver.stop()


def main(argv=None) -> int:
    from vigil.paths import default_demo_dir

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-dir", default=default_demo_dir())
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--busy", action="store_true", help="steady traffic before the hang")
    parser.add_argument("--busy-seconds", type=float, default=150.0)
    parser.add_argument(
        "--settle", type=float, default=70.0, help="seconds of history before the hang"
    )
    args = parser.parse_args(argv)
    seconds = []
    for index in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="vigil-engine-hang-") as tmp:
            seconds.append(
                one_round(
                    args.demo_dir, Path(tmp), args.busy_seconds if args.busy else 0.0, args.settle
                )
            )
        print(f"round {index + 1}: hang to notification {seconds[-1]:.1f} s", flush=True)
    print(
        f"InferenceEngineNoProgress, shipped defaults, "
        f"{'after steady traffic' if args.busy else 'first work of an idle engine'}, "
        f"{len(seconds)} rounds: "
        f"median {statistics.median(seconds):.1f} s, min {min(seconds):.1f} s, "
        f"max {max(seconds):.1f} s (the rule's floor: 1 m without progress, and 1 m of "
        f"pending work, + 1 m for)",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
