"""Delivery to one relay, in the background: a bounded queue and one thread that sends from it
in order (a resolution never overtakes its firing).

- Pace: the thread keeps to the robot's documented rate (``Relay.rate_limits``: DingTalk 20
  messages a minute), so that a storm of alerts does not get the robot throttled; what waits
  meanwhile is sent as one digest message, as much of it as fits the tool's size limit, in
  order.
- The dead man's switch's alarm and recovery go ahead of every message waiting (``urgent``):
  a backlog of alerts never holds up the news that alerts may not arrive at all.
- A failed attempt is tried again after a delay that doubles each time, at most
  ``MAX_RETRY_DELAY_S``, up to the configured number of attempts; then the message is given up.
- A refusal that no retry changes (a robot's secret, keyword or IP allow-list:
  ``RelayRefused``) is given up at once, with what to check.
- A robot that says it is throttling (``RelayThrottled``) is waited out, ``throttle_wait``
  seconds at a time, at most ``MAX_THROTTLE_WAITS`` times per message, spending no attempt.

Every failed attempt, every give-up and every message that finds the queue full is logged and
printed: nothing is dropped silently."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import requests
from loguru import logger

from .message import TAG
from .metrics import NotifierMetrics
from .relays import Relay, RelayError, RelayRefused, RelayThrottled

MAX_RETRY_DELAY_S = 60.0
# Throttling waited out per message at most: 12 x the default 60 s is past DingTalk's 10
# minutes; after that, a throttled answer counts as a failed attempt.
MAX_THROTTLE_WAITS = 12
DIGEST_SEPARATOR = "\n\n――――――――\n\n"


@dataclass(frozen=True)
class Outgoing:
    text: str
    what: str  # how the console and the log name it ("FIRING InferenceEngineStalled", ...)
    urgent: bool = False  # the dead man's switch: ahead of every message waiting
    count: int = 1  # notifications it carries (a digest carries several)


def digest(parts: list[Outgoing]) -> Outgoing:
    """Messages that waited for the robot, as one: a heading, then each whole, in order."""
    count = sum(p.count for p in parts)
    heading = (
        f"{TAG} {count} notifications, sent as one message (they waited for this robot's rate "
        "limit or for an earlier message)"
    )
    names = "; ".join(p.what for p in parts[:3]) + ("; …" if len(parts) > 3 else "")
    return Outgoing(
        DIGEST_SEPARATOR.join([heading, *(p.text for p in parts)]),
        f"{count} notifications ({names})",
        count=count,
    )


class RateLimit:
    """At most ``count`` requests in any ``period`` seconds, for each (count, period)."""

    def __init__(
        self, limits: Iterable[tuple[int, float]], clock: Callable[[], float] = time.monotonic
    ):
        self._limits = tuple(limits)
        self._clock = clock
        self._sent: deque[float] = deque(maxlen=max((c for c, _ in self._limits), default=1))

    def delay(self) -> float:
        """Seconds until one more request keeps within every limit (0: now)."""
        now = self._clock()
        wait = 0.0
        for count, period in self._limits:
            if len(self._sent) >= count:
                wait = max(wait, self._sent[-count] + period - now)
        return wait

    def record(self) -> None:
        """A request is being sent now."""
        self._sent.append(self._clock())


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
        throttle_wait: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.relay = relay
        self._say = say
        self._metrics = metrics
        self._attempts = attempts
        self._retry_delay = retry_delay
        self._timeout = timeout
        self._queue_size = queue_size
        self._throttle_wait = throttle_wait
        self._pace = RateLimit(relay.rate_limits, clock)
        self._waiting: deque[Outgoing] = deque()
        self._changed = threading.Condition()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"relay-{relay.name}", daemon=True)
        self._session = requests.Session()

    def start(self) -> None:
        self._thread.start()

    def submit(self, text: str, what: str, *, urgent: bool = False) -> bool:
        """Queue a message (an urgent one ahead of all but the urgent ones already waiting);
        False (said and counted) when the queue is full, which an urgent one never finds."""
        item = Outgoing(text, what, urgent)
        with self._changed:
            full = not urgent and len(self._waiting) >= self._queue_size
            if urgent:
                ahead = sum(1 for waiting in self._waiting if waiting.urgent)
                self._waiting.insert(ahead, item)
            elif not full:
                self._waiting.append(item)
            self._changed.notify()
        if full:
            self._dropped(item, f"its queue is full ({self._queue_size})")
        return not full

    def stop(self, grace: float = 5.0) -> None:
        """Stop after the attempt in flight; what is still queued is said to be dropped."""
        self._stopping.set()
        with self._changed:
            self._changed.notify()
        if self._thread.is_alive():
            self._thread.join(grace)
        with self._changed:
            left, self._waiting = list(self._waiting), deque()
        for item in left:
            self._dropped(item, "the notifier stopped before it was sent")
        self._session.close()

    def _run(self) -> None:
        while not self._stopping.is_set():
            with self._changed:
                if not self._waiting:
                    self._changed.wait(0.2)
                    continue
            # Keep to the robot's rate first: what queues meanwhile goes with this message.
            if not self._paced():
                return
            self._deliver(self._take())

    def _take(self) -> Outgoing:
        """The first message waiting; with the messages behind it that fit in one message,
        unless it is urgent (said alone, at once)."""
        with self._changed:
            parts = [self._waiting.popleft()]
            if parts[0].urgent:
                return parts[0]
            while self._waiting and not self._waiting[0].urgent:
                if not self.relay.fits(digest([*parts, self._waiting[0]]).text):
                    break
                parts.append(self._waiting.popleft())
        return parts[0] if len(parts) == 1 else digest(parts)

    def _paced(self) -> bool:
        """Wait until one more request keeps to the robot's rate; False when stopping."""
        while (delay := self._pace.delay()) > 0:
            if self._stopping.wait(min(delay, 1.0)):
                return False
        return not self._stopping.is_set()

    def _deliver(self, item: Outgoing) -> None:
        name = self.relay.name
        delay = self._retry_delay
        attempt, throttled = 1, 0
        while True:
            if not self._paced():
                self._dropped(item, "the notifier stopped before it was sent")
                return
            self._pace.record()
            try:
                self.relay.send(item.text, self._session, self._timeout)
            except RelayThrottled as exc:
                if throttled < MAX_THROTTLE_WAITS:
                    throttled += 1
                    if not self._wait_out_throttling(item, exc, throttled):
                        return
                    continue
                failure: Exception = exc  # throttled past every wait: a failed attempt
            except RelayRefused as exc:
                self._metrics.relay_failures.labels(name).inc()
                logger.bind(relay=name, notification=item.what, attempt=attempt).error(
                    "relay refused the message: {}", exc
                )
                self._give_up(item, attempt, exc)
                return
            except RelayError as exc:
                failure = exc
            except Exception:  # noqa: BLE001 - a bug must not end the thread and lose the queue
                logger.bind(relay=name, notification=item.what).exception("relay attempt crashed")
                self._metrics.relay_failures.labels(name).inc()
                self._give_up(item, attempt, None)
                return
            else:
                self._metrics.relay_messages.labels(name, "sent").inc(item.count)
                logger.bind(relay=name, notification=item.what, attempt=attempt).info("relayed")
                if attempt > 1 or throttled:
                    self._say(f"relay {name}: {item.what} sent at attempt {attempt}")
                return
            self._metrics.relay_failures.labels(name).inc()
            logger.bind(
                relay=name, notification=item.what, attempt=attempt, attempts=self._attempts
            ).error("relay attempt failed: {}", failure)
            if attempt == self._attempts:
                self._give_up(item, attempt, None)
                return
            self._say(
                f"relay {name}: attempt {attempt}/{self._attempts} for {item.what} failed "
                f"({failure}); trying again in {delay:g} s"
            )
            if self._stopping.wait(delay):
                self._dropped(item, f"the notifier stopped while retrying (last: {failure})")
                return
            delay = min(delay * 2, MAX_RETRY_DELAY_S)
            attempt += 1

    def _wait_out_throttling(self, item: Outgoing, exc: RelayThrottled, waits: int) -> bool:
        """Wait ``throttle_wait`` seconds (no attempt spent); False when stopping."""
        name = self.relay.name
        logger.bind(relay=name, notification=item.what, waits=waits).warning(
            "relay throttled: {}", exc
        )
        self._say(
            f"relay {name}: {item.what} not sent: the robot is throttling this notifier ({exc}); "
            f"trying again in {self._throttle_wait:g} s (wait {waits}/{MAX_THROTTLE_WAITS}, no "
            "attempt spent)"
        )
        if self._stopping.wait(self._throttle_wait):
            self._dropped(item, f"the notifier stopped while the robot was throttling ({exc})")
            return False
        return True

    def _give_up(self, item: Outgoing, attempts: int, refusal: RelayRefused | None) -> None:
        name = self.relay.name
        self._metrics.relay_messages.labels(name, "gave_up").inc(item.count)
        hint = refusal.hint if refusal is not None else None
        logger.bind(relay=name, notification=item.what, attempts=attempts, hint=hint).error(
            "relay gave up: the message was not delivered"
        )
        if refusal is not None:
            self._say(
                f"RELAY FAILED: {name} refused {item.what} ({refusal}): {hint}. It was not "
                "delivered there, and not tried again (another attempt would be refused alike)"
            )
        else:
            self._say(
                f"RELAY FAILED: {name} did not take {item.what} after {attempts} attempt"
                f"{'s' if attempts != 1 else ''}; it was not delivered there (see the errors above)"
            )

    def _dropped(self, item: Outgoing, why: str) -> None:
        self._metrics.relay_messages.labels(self.relay.name, "dropped").inc(item.count)
        logger.bind(relay=self.relay.name, notification=item.what).error(
            "relay message dropped: {}", why
        )
        self._say(f"RELAY FAILED: {item.what} was not sent to {self.relay.name}: {why}")
