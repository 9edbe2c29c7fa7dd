"""Detection latency: from the start of an injected hang to the notification at the receiver.

Each round starts the whole pipeline on loopback (the inference process on the demo model with
fault injection, the exporter, Prometheus with the shipped rules, Alertmanager with the shipped
configuration pointed at a webhook receiver run here), waits until the always-firing Watchdog
arrives (the pipeline works), arms a hang that never ends, sends one completion, and times the
InferenceEngineStalled notification.

Two settings:
- defaults: the shipped files as they are (scrape and evaluation every 10 s, --stall-timeout 30,
  --on-stall exit: the process exits with 75 after its stall report and the alert comes from the
  stall counter it left; critical group_wait 5 s);
- short: the end-to-end test's intervals (1 s scrape and evaluation, --stall-timeout 2, 1 s
  grouping).
Prometheus runs with --rules.alert.resend-delay=1s so that the Watchdog, dropped while
Prometheus has not yet found Alertmanager, comes back in a second rather than a minute; a new
alert such as the hang is sent at the evaluation that finds it whatever that delay.

Run: ``.venv/bin/python bench/alert_latency.py`` (about 5 minutes).
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
sys.path.insert(0, str(REPO))

from conftest import (  # noqa: E402
    WebhookReceiver,
    start_alertmanager,
    start_exporter,
    start_prometheus,
    start_server,
)

from alerts.rules import ALERTS_DIR, render  # noqa: E402


def configs(mode: str, receiver_url: str, rules_dir: Path) -> tuple[str, dict]:
    am = yaml.safe_load((ALERTS_DIR / "alertmanager.yml").read_text())
    for receiver in am["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            hook["url"] = receiver_url + "/" + hook["url"].rsplit("/", 1)[1]
    shipped = yaml.safe_load((ALERTS_DIR / "prometheus.yml").read_text())["global"]
    if mode == "short":

        def shorten(route):
            route["group_wait"] = route["group_interval"] = "1s"
            for child in route.get("routes", []):
                shorten(child)

        shorten(am["route"])
        shipped = {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"}
        for name, text in render({"stall_window": "15s", "evaluation_interval": "1s"}).items():
            (rules_dir / name).write_text(text)
    else:
        for name, text in render().items():
            (rules_dir / name).write_text(text)
    return yaml.safe_dump(am), shipped


def one_round(mode: str, demo_dir: str, workdir: Path) -> float:
    rules_dir = workdir / "rules"
    rules_dir.mkdir()
    receiver = WebhookReceiver()
    am_text, intervals = configs(mode, receiver.url, rules_dir)
    stall = ["--stall-timeout", "2", "--on-stall", "report"] if mode == "short" else []
    server = start_server(workdir, demo_dir, "--enable-fault-injection", *stall)
    exporter = start_exporter(
        workdir, server.state_dir, "--target", server.base_url, "--gpu-backend", "none"
    )
    manager = start_alertmanager(workdir, am_text)
    prometheus = start_prometheus(
        workdir,
        yaml.safe_dump(
            {
                "global": intervals,
                "rule_files": [str(rules_dir / "*.rules.yml")],
                "alerting": {
                    "alertmanagers": [
                        {
                            "static_configs": [
                                {"targets": [manager.base_url.removeprefix("http://")]}
                            ]
                        }
                    ]
                },
                "scrape_configs": [
                    {
                        "job_name": "vigil-exporter",
                        "static_configs": [
                            {"targets": [exporter.base_url.removeprefix("http://")]}
                        ],
                    }
                ],
            }
        ),
        "--rules.alert.resend-delay=1s",
    )
    try:
        receiver.wait_for("Watchdog", timeout=120)
        started = server.hang_a_request()
        fired = receiver.wait_for("InferenceEngineStalled", timeout=300, after=started)
        return fired["received_at"] - started
    finally:
        for part in (prometheus, manager, exporter, server):
            part.stop()
        receiver.stop()


def main(argv=None) -> int:
    from inference.config import Config

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-dir", default=Config().demo_dir)
    parser.add_argument("--default-rounds", type=int, default=2)
    parser.add_argument("--short-rounds", type=int, default=3)
    args = parser.parse_args(argv)
    results: dict[str, list[float]] = {"defaults": [], "short": []}
    for mode, rounds in (("short", args.short_rounds), ("defaults", args.default_rounds)):
        for index in range(rounds):
            with tempfile.TemporaryDirectory(prefix="vigil-bench-alert-") as tmp:
                seconds = one_round(mode, args.demo_dir, Path(tmp))
            results[mode].append(seconds)
            print(f"{mode:>8} round {index + 1}: hang notified after {seconds:.1f} s", flush=True)
    print("detection latency, hang start -> notification at the receiver (seconds):")
    for mode, values in results.items():
        if values:
            threshold = 30.0 if mode == "defaults" else 2.0
            print(
                f"  {mode:>8}: median {statistics.median(values):.1f}, max {max(values):.1f} "
                f"over {len(values)} round(s); stall timeout {threshold:g} s; "
                f"goal (defaults) 60 s: {max(values) / 60:.2f}x"
                if mode == "defaults"
                else f"  {mode:>8}: median {statistics.median(values):.1f}, max {max(values):.1f} "
                f"over {len(values)} round(s); stall timeout {threshold:g} s"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
