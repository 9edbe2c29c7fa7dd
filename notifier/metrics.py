"""The notifier's own metrics, on its GET /metrics (names in base units, as everywhere here)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge


@dataclass
class NotifierMetrics:
    registry: CollectorRegistry
    notifications: Counter
    relay_messages: Counter
    relay_failures: Counter
    pipeline_broken: Gauge
    console_dropped: Counter


def build_metrics() -> NotifierMetrics:
    registry = CollectorRegistry(auto_describe=True)
    return NotifierMetrics(
        registry=registry,
        notifications=Counter(
            "vigil_notifier_notifications",
            "Webhook notifications received from Alertmanager, by endpoint (alerts, watchdog) "
            "and the notification's status (firing, resolved).",
            ("endpoint", "status"),
            registry=registry,
        ),
        relay_messages=Counter(
            "vigil_notifier_relay_messages",
            "Notifications a relay finished with, by outcome: sent, gave_up (every attempt "
            "failed, or the robot refused it in a way no retry changes) or dropped (its queue "
            "was full, or the notifier stopped first). A digest counts each notification in it.",
            ("relay", "outcome"),
            registry=registry,
        ),
        relay_failures=Counter(
            "vigil_notifier_relay_failures",
            "Failed attempts to send to a relay (retried until the attempts run out, unless "
            "the robot's answer says no retry would help); a robot that is throttling is waited "
            "out and not counted.",
            ("relay",),
            registry=registry,
        ),
        pipeline_broken=Gauge(
            "vigil_notifier_pipeline_broken",
            "1 while no Watchdog has arrived from Alertmanager for --watchdog-timeout seconds "
            "(the dead man's switch has fired), else 0.",
            registry=registry,
        ),
        console_dropped=Counter(
            "vigil_notifier_console_lines_dropped",
            "Lines not printed on stdout because it was not being read (a full pipe, a paused "
            "pager): the log on stderr has every notification.",
            registry=registry,
        ),
    )
