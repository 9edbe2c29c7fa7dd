"""Delivery to one relay, in the background: a bounded queue and one thread that sends from it
in order (a resolution never overtakes its firing). A failed attempt is tried again after a
delay that doubles each time, at most ``MAX_RETRY_DELAY_S``, up to the configured number of
attempts; then the message is given up. Every failed attempt, every give-up and every message
that finds the queue full is logged and printed: nothing is dropped silently."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

import requests
from loguru import logger

from .metrics import NotifierMetrics
from .relays import Relay, RelayError

MAX_RETRY_DELAY_S = 60.0


@dataclass(frozen=True)
class Outgoing:
    text: str
    what: str  # how the console and the log name it ("FIRING InferenceEngineStalled", ...)


class RelayWorker:
    def __init__(
        self,
        relay: Relay,
        say: Callable[[str], None],
        metrics: NotifierMetrics,
        *,
        attempts: int,
        retry_delay: float,
        timeout: float,
        queue_size: int,
    ):
        self.relay = relay
        self._say = say
        self._metrics = metrics
        self._attempts = attempts
        self._retry_delay = retry_delay
        self._timeout = timeout
        self._queue: queue.Queue[Outgoing] = queue.Queue(maxsize=queue_size)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"relay-{relay.name}", daemon=True)
        self._session = requests.Session()

    def start(self) -> None:
        self._thread.start()

    def submit(self, text: str, what: str) -> bool:
        """Queue a message; False (said and counted) when the queue is full."""
        try:
            self._queue.put_nowait(Outgoing(text, what))
            return True
        except queue.Full:
            self._dropped(Outgoing(text, what), f"its queue is full ({self._queue.maxsize})")
            return False

    def stop(self, grace: float = 5.0) -> None:
        """Stop after the attempt in flight; what is still queued is said to be dropped."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(grace)
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            self._dropped(item, "the notifier stopped before it was sent")
        self._session.close()

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                item = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            self._deliver(item)

    def _deliver(self, item: Outgoing) -> None:
        name = self.relay.name
        delay = self._retry_delay
        for attempt in range(1, self._attempts + 1):
            try:
                self.relay.send(item.text, self._session, self._timeout)
            except RelayError as exc:
                self._metrics.relay_failures.labels(name).inc()
                last = attempt == self._attempts
                logger.bind(
                    relay=name, notification=item.what, attempt=attempt, attempts=self._attempts
                ).error("relay attempt failed: {}", exc)
                if last:
                    break
                self._say(
                    f"relay {name}: attempt {attempt}/{self._attempts} for {item.what} failed "
                    f"({exc}); trying again in {delay:g} s"
                )
                if self._stopping.wait(delay):
                    self._dropped(item, f"the notifier stopped while retrying (last: {exc})")
                    return
                delay = min(delay * 2, MAX_RETRY_DELAY_S)
            except Exception:  # noqa: BLE001 - a bug must not end the thread and lose the queue
                logger.bind(relay=name, notification=item.what).exception("relay attempt crashed")
                self._metrics.relay_failures.labels(name).inc()
                break
            else:
                self._metrics.relay_messages.labels(name, "sent").inc()
                logger.bind(relay=name, notification=item.what, attempt=attempt).info("relayed")
                if attempt > 1:
                    self._say(f"relay {name}: {item.what} sent at attempt {attempt}")
                return
        self._metrics.relay_messages.labels(name, "gave_up").inc()
        logger.bind(relay=name, notification=item.what, attempts=self._attempts).error(
            "relay gave up: the message was not delivered"
        )
        self._say(
            f"RELAY FAILED: {name} did not take {item.what} after {self._attempts} attempts; "
            "it was not delivered there (see the errors above)"
        )

    def _dropped(self, item: Outgoing, why: str) -> None:
        self._metrics.relay_messages.labels(self.relay.name, "dropped").inc()
        logger.bind(relay=self.relay.name, notification=item.what).error(
            "relay message dropped: {}", why
        )
        self._say(f"RELAY FAILED: {item.what} was not sent to {self.relay.name}: {why}")
