"""Detection latency of the any-engine hang alert (InferenceEngineNoProgress) with the shipped
defaults: from the start of a hang to the notification at the receiver.

The engine is this project's inference process on the demo model, watched as a foreign engine
is: Prometheus scrapes its own /metrics (a job of its own, as for vLLM), the exporter probes it
and does not share its state directory, and its watchdog is kept out of the way
(--stall-timeout 3600), as an engine without one. Each round arms a decode hang that never ends,
sends one completion, and times the InferenceEngineNoProgress notification. The shipped files
are used as they are: scrape and evaluation every 10 s, the progress rate over 1 m, the alert's
for of 1 m (engine_hang_for), Alertmanager's critical group_wait.

Run: ``.venv/bin/python bench/engine_hang_latency.py [--rounds 3]`` (about 3 minutes a round).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

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


def one_round(demo_dir: str, workdir: Path) -> float:
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
        started = server.hang_a_request()
        fired = receiver.wait_for("InferenceEngineNoProgress", timeout=420, after=started)
        assert fired["labels"]["engine"] == "vigil", fired["labels"]
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
    args = parser.parse_args(argv)
    seconds = []
    for index in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="vigil-engine-hang-") as tmp:
            seconds.append(one_round(args.demo_dir, Path(tmp)))
        print(f"round {index + 1}: hang to notification {seconds[-1]:.1f} s", flush=True)
    print(
        f"InferenceEngineNoProgress, shipped defaults, {len(seconds)} rounds: "
        f"median {statistics.median(seconds):.1f} s, min {min(seconds):.1f} s, "
        f"max {max(seconds):.1f} s (the rule's own floor: 1 m rate window + 1 m for)",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
