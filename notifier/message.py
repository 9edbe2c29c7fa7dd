"""Alertmanager's webhook payload read into typed values, and rendered as text: one line per
alert for the console, one message per notification for a chat relay, cut to fit the relay's
size limit with a note of how many alerts were left out.

The payload, version 4 (https://prometheus.io/docs/alerting/latest/configuration/#webhook_config):

    {"version": "4", "groupKey": str, "truncatedAlerts": int (left out by max_alerts),
     "status": "firing" | "resolved", "receiver": str, "groupLabels": {str: str},
     "commonLabels": {str: str}, "commonAnnotations": {str: str}, "externalURL": str,
     "alerts": [{"status": "firing" | "resolved", "labels": {str: str},
                 "annotations": {str: str}, "startsAt": RFC 3339, "endsAt": RFC 3339,
                 "generatorURL": str, "fingerprint": str}, ...]}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

# The labels that say where an alert is, in this order (the rules' vocabulary: alerts/rules.py).
LOCATION_LABELS = ("instance", "model", "gpu", "stage")
STATUSES = ("firing", "resolved")
# Chat messages start with this, so that a robot's keyword security setting can use it.
TAG = "[llm-vigil]"
# Longest annotation or label value a chat message carries; a longer one is cut (the console
# and the log keep it whole). One alert's block stays far below any relay's limit.
MAX_FIELD_CHARS = 1000
# Alertmanager writes this for "no end time yet".
_ZERO_TIME = "0001-01-01T00:00:00Z"


class PayloadError(ValueError):
    """A body that is not an Alertmanager webhook payload; the message says what is wrong."""


@dataclass(frozen=True)
class Alert:
    status: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    starts_at: str = ""
    ends_at: str = ""
    generator_url: str = ""
    fingerprint: str = ""

    @property
    def name(self) -> str:
        return self.labels.get("alertname", "(no alertname)")

    @property
    def severity(self) -> str:
        return self.labels.get("severity", "")

    @property
    def summary(self) -> str:
        return self.annotations.get("summary") or self.annotations.get("description") or ""

    @property
    def runbook_url(self) -> str:
        return self.annotations.get("runbook_url", "")

    @property
    def location(self) -> list[tuple[str, str]]:
        return [(k, self.labels[k]) for k in LOCATION_LABELS if self.labels.get(k)]


@dataclass(frozen=True)
class Notification:
    status: str
    alerts: tuple[Alert, ...]
    receiver: str = ""
    group_key: str = ""
    group_labels: Mapping[str, str] | None = None
    common_labels: Mapping[str, str] | None = None
    external_url: str = ""
    truncated_alerts: int = 0
    version: str = ""

    def firing(self) -> list[Alert]:
        return [a for a in self.alerts if a.status == "firing"]


def _strings(value: Any, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise PayloadError(f"{where} must be an object of strings")
    return {str(k): "" if v is None else str(v) for k, v in value.items()}


def _string(value: Any) -> str:
    return "" if value is None else str(value)


def parse(payload: Any) -> Notification:
    """The notification in a decoded JSON body; PayloadError when it is not one."""
    if not isinstance(payload, dict):
        raise PayloadError("the body must be a JSON object (Alertmanager's webhook payload)")
    alerts_in = payload.get("alerts")
    if not isinstance(alerts_in, list):
        raise PayloadError("'alerts' must be a list (Alertmanager's webhook payload, version 4)")
    alerts = []
    for i, item in enumerate(alerts_in):
        if not isinstance(item, dict):
            raise PayloadError(f"alerts[{i}] must be an object")
        status = item.get("status")
        if status not in STATUSES:
            raise PayloadError(f"alerts[{i}].status must be firing or resolved, not {status!r}")
        alerts.append(
            Alert(
                status=status,
                labels=_strings(item.get("labels"), f"alerts[{i}].labels"),
                annotations=_strings(item.get("annotations"), f"alerts[{i}].annotations"),
                starts_at=_string(item.get("startsAt")),
                ends_at=_string(item.get("endsAt")),
                generator_url=_string(item.get("generatorURL")),
                fingerprint=_string(item.get("fingerprint")),
            )
        )
    status = payload.get("status")
    if status is None:
        status = "firing" if any(a.status == "firing" for a in alerts) else "resolved"
    elif status not in STATUSES:
        raise PayloadError(f"'status' must be firing or resolved, not {status!r}")
    truncated = payload.get("truncatedAlerts") or 0
    if not isinstance(truncated, int) or isinstance(truncated, bool) or truncated < 0:
        raise PayloadError("'truncatedAlerts' must be a non-negative integer")
    return Notification(
        status=status,
        alerts=tuple(alerts),
        receiver=_string(payload.get("receiver")),
        group_key=_string(payload.get("groupKey")),
        group_labels=_strings(payload.get("groupLabels"), "groupLabels"),
        common_labels=_strings(payload.get("commonLabels"), "commonLabels"),
        external_url=_string(payload.get("externalURL")),
        truncated_alerts=truncated,
        version=_string(payload.get("version")),
    )


# --- the console: one line per alert --------------------------------------------------------


def console_line(alert: Alert) -> str:
    """FIRING [critical] InferenceEngineStalled instance=... model=demo: summary | runbook: URL"""
    line = f"{alert.status.upper()} [{alert.severity or 'no severity'}] {alert.name}"
    if alert.location:
        line += " " + " ".join(f"{k}={v}" for k, v in alert.location)
    line += ": " + _one_line(alert.summary or "(no summary annotation)")
    if alert.runbook_url:
        line += f" | runbook: {alert.runbook_url}"
    return line


def _one_line(text: str) -> str:
    return " ".join(text.split())


# --- chat relays: one message per notification, within a size limit --------------------------


def _cut(text: str, limit: int = MAX_FIELD_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def title(notification: Notification) -> str:
    """As alerts/templates/vigil.tmpl's vigil.title: [FIRING:2] Name (model) on instance."""
    common = notification.common_labels or {}
    status = notification.status.upper()
    if notification.status == "firing":
        status += f":{len(notification.firing())}"
    names = sorted({a.name for a in notification.alerts})
    name = common.get("alertname") or ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    text = f"{TAG} [{status}] {name}"
    if common.get("model"):
        text += f" ({common['model']})"
    if common.get("instance"):
        text += f" on {common['instance']}"
    return _cut(text)


def alert_block(alert: Alert) -> str:
    """One alert in a chat message: what, where, the summary and description, the runbook."""
    lines = [f"{alert.status.upper()} [{alert.severity or 'no severity'}] {alert.name}"]
    if alert.location:
        lines.append(_cut(" ".join(f"{k}={v}" for k, v in alert.location)))
    summary = alert.annotations.get("summary", "")
    description = alert.annotations.get("description", "")
    for text in (summary, description if description != summary else ""):
        if text:
            lines.append(_cut(text.strip()))
    if alert.runbook_url:
        lines.append("Runbook: " + _cut(alert.runbook_url))
    if alert.starts_at:
        since = f"Since: {alert.starts_at}"
        if alert.status == "resolved" and alert.ends_at and alert.ends_at != _ZERO_TIME:
            since += f", resolved: {alert.ends_at}"
        lines.append(since)
    return "\n".join(lines)


def _left_out_note(shown: int, notification: Notification, limit_name: str) -> str:
    notes = []
    left = len(notification.alerts) - shown
    if left:
        notes.append(
            f"{left} more alert{'s' if left != 1 else ''} of this notification left out to fit "
            f"{limit_name}"
        )
    if notification.truncated_alerts:
        notes.append(
            f"Alertmanager left out {notification.truncated_alerts} more (max_alerts of its "
            "webhook receiver)"
        )
    if not notes:
        return ""
    where = f"; all of them: {notification.external_url}" if notification.external_url else ""
    return "… " + "; ".join(notes) + where


def relay_text(notification: Notification, fits: Callable[[str], bool], limit_name: str) -> str:
    """The notification as one chat message that ``fits`` (the relay's size check): the title,
    as many alerts as fit in payload order, and a note of how many were left out."""

    def compose(shown: int) -> str:
        parts = [title(notification), *map(alert_block, notification.alerts[:shown])]
        note = _left_out_note(shown, notification, limit_name)
        if note:
            parts.append(note)
        return "\n\n".join(parts)

    total = len(notification.alerts)
    if fits(compose(total)):
        return compose(total)
    low, high = 0, total - 1  # the most alerts that fit: compose(low) fits or low is 0
    while low < high:
        middle = (low + high + 1) // 2
        if fits(compose(middle)):
            low = middle
        else:
            high = middle - 1
    return fit_text(compose(low), fits)


def fit_text(text: str, fits: Callable[[str], bool]) -> str:
    """``text``, or its longest beginning (marked as cut) that fits."""
    if fits(text):
        return text
    low, high = 0, len(text)
    while low < high:
        middle = (low + high + 1) // 2
        if fits(text[:middle] + "…"):
            low = middle
        else:
            high = middle - 1
    return text[:low] + "…"
