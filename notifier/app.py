"""Assembles the notifier from its configuration and serves until told to stop: what happens to
each notification (printed, logged, counted, queued for each relay) and to the dead man's
switch's events (printed, logged, relayed)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from loguru import logger

from vigil.listen import bind_error, host_port
from vigil.serving import wait_for_stop

from .config import ConfigError, NotifierConfig
from .console import Console
from .delivery import RelayWorker
from .message import TAG, Notification, console_line, fit_text, relay_text
from .metrics import NotifierMetrics, build_metrics
from .relays import Relay, keep_http_client_logs_quiet
from .relays.dingtalk import DingTalk
from .relays.feishu import Feishu
from .server import Handlers, make_server, serve_in_thread
from .watchdog import DeadMansSwitch

# Said when the port is in use (vigil.listen.bind_error).
PORT_BUSY = (
    "is another notifier (or webhook receiver) using that port? point alertmanager.yml's "
    "webhook_configs at the port you choose, and"
)


def build_relays(config: NotifierConfig) -> list[Relay]:
    relays: list[Relay] = []
    if config.dingtalk_webhook:
        relays.append(DingTalk(config.dingtalk_webhook, config.dingtalk_secret))
    if config.feishu_webhook:
        relays.append(Feishu(config.feishu_webhook, config.feishu_secret))
    return relays


@dataclass
class Notifier:
    config: NotifierConfig
    metrics: NotifierMetrics = field(default_factory=build_metrics)
    console: Console | None = None  # stdout, through its queue
    workers: list[RelayWorker] = field(default_factory=list)
    switch: DeadMansSwitch | None = None
    server: Any = None
    port: int = 0

    def __post_init__(self) -> None:
        if self.console is None:
            self.console = Console(on_dropped=self.metrics.console_dropped.inc)
        self.workers = [
            RelayWorker(
                relay,
                self.console.print,
                self.metrics,
                attempts=self.config.relay_attempts,
                retry_delay=self.config.relay_retry_delay,
                timeout=self.config.relay_timeout,
                queue_size=self.config.relay_queue,
                throttle_wait=self.config.relay_throttle_wait,
            )
            for relay in build_relays(self.config)
        ]
        self.switch = DeadMansSwitch(self.config.watchdog_timeout, self.on_switch)

    # --- notifications --------------------------------------------------------------------

    def on_notification(
        self, endpoint: str, notification: Notification, relays: tuple[str, ...] | None = None
    ) -> None:
        """Queue the notification for the relays (all of them, or those the webhook URL
        names), then print and log each alert (printing never waits for stdout, and the relays
        come first all the same); the Watchdog goes to the dead man's switch instead."""
        self.metrics.notifications.labels(endpoint, notification.status).inc()
        if endpoint == "watchdog":
            self._watchdog(notification)
            return
        what = _what(notification)
        for worker in self._chosen(relays, endpoint):
            text = relay_text(notification, worker.relay.fits, worker.relay.limit_name)
            worker.submit(text, what)
        for alert in notification.alerts:
            self.console.print(console_line(alert))
            logger.bind(
                receiver=notification.receiver,
                status=alert.status,
                alertname=alert.name,
                severity=alert.severity,
                **{label: value for label, value in alert.location},
                summary=alert.summary,
                runbook_url=alert.runbook_url,
                starts_at=alert.starts_at,
                ends_at=alert.ends_at,
                fingerprint=alert.fingerprint,
            ).log("WARNING" if alert.status == "firing" else "INFO", "alert notification")
        if notification.truncated_alerts:
            self.console.print(
                f"... and {notification.truncated_alerts} more alerts Alertmanager left out of "
                f"this notification (max_alerts); all of them: {notification.external_url}"
            )

    def _chosen(self, names: tuple[str, ...] | None, endpoint: str) -> list[RelayWorker]:
        if names is None:
            return self.workers
        configured = {w.relay.name: w for w in self.workers}
        for name in names:
            if name not in configured:
                variable = f"VIGIL_NOTIFIER_{name.upper()}_WEBHOOK"
                known = "dingtalk, feishu"
                text = (
                    f"RELAY FAILED: /{endpoint}?relay={name} in alertmanager.yml names a relay "
                    + (
                        f"this notifier has no webhook for (set {variable})"
                        if name in ("dingtalk", "feishu")
                        else f"that does not exist (relays: {known})"
                    )
                )
                self.console.print(text)
                logger.bind(relay=name, endpoint=endpoint).error(text)
        return [configured[name] for name in dict.fromkeys(names) if name in configured]

    def _watchdog(self, notification: Notification) -> None:
        firing = notification.firing()
        names = sorted({a.name for a in notification.alerts})
        if firing:
            logger.bind(alerts=names).debug("watchdog received")
            self.switch.received()
        else:  # send_resolved is off on that route; a resolution says Prometheus stopped
            logger.bind(alerts=names).warning("watchdog notification without a firing alert")
            self.console.print(
                f"the dead man's switch received {', '.join(names) or 'no alert'} resolved: "
                "Prometheus has stopped sending the Watchdog"
            )

    def on_switch(self, kind: str, text: str) -> None:
        self.metrics.pipeline_broken.set(1 if kind in ("broken", "still_broken") else 0)
        self.console.print(text)
        if kind == "ok":
            logger.bind(event=kind).info(text)
            return
        if kind == "recovered":
            logger.bind(event=kind).warning(text)
        else:
            logger.bind(event=kind).error(text)
        title = "ALERTING PIPELINE BROKEN" if kind != "recovered" else "alerting pipeline recovered"
        for worker in self.workers:  # ahead of any backlog of alerts
            text_fit = fit_text(f"{TAG} {title}\n\n{text}", worker.relay.fits)
            worker.submit(text_fit, title, urgent=True)

    def health(self) -> dict[str, Any]:
        age = self.switch.last_age()
        return {
            "watchdog": self.switch.state,
            "watchdog_age_seconds": None if age is None else round(age, 1),
            "relays": [w.relay.name for w in self.workers],
        }

    # --- life -----------------------------------------------------------------------------

    def start(self) -> None:
        """Listen and start the background work; ConfigError when the address cannot be had."""
        handlers = Handlers(self.on_notification, self.health, self.metrics.registry)
        try:
            self.server = make_server(self.config.host, self.config.port, handlers)
        except OSError as exc:
            raise ConfigError(
                bind_error(self.config.host, self.config.port, exc, busy=PORT_BUSY)
            ) from None
        self.port = self.server.server_address[1]
        for worker in self.workers:
            worker.start()
        self.switch.start()
        serve_in_thread(self.server)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        self.switch.stop()
        for worker in self.workers:
            worker.stop()
        self.console.close()


def _what(notification: Notification) -> str:
    names = sorted({a.name for a in notification.alerts})
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    count = len(notification.alerts)
    return f"{notification.status.upper()} {shown} ({count} alert{'s' if count != 1 else ''})"


def serve(config: NotifierConfig) -> int:
    notifier = Notifier(config)
    keep_http_client_logs_quiet(w.relay for w in notifier.workers)
    notifier.start()
    address = host_port(config.host, notifier.port)
    relays = ", ".join(w.relay.name for w in notifier.workers) or (
        "none (printing only; --dingtalk-webhook or --feishu-webhook to relay)"
    )
    notifier.console.print(
        f"notifier listening on http://{address} (Alertmanager webhooks: POST /alerts, POST "
        f"/watchdog); relays: {relays}; dead man's switch: alarm after "
        f"{config.watchdog_timeout:g} s without a Watchdog"
    )
    logger.bind(relays=[w.relay.name for w in notifier.workers]).info(
        "listening on http://{}", address
    )
    wait_for_stop()
    logger.info("stopping")
    notifier.stop()
    return 0
