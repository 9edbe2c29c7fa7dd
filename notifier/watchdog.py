"""The dead man's switch: Prometheus fires the Watchdog alert all the time (alerts/
meta.rules.yml) and Alertmanager's deadmansswitch route sends it to POST /watchdog every minute.
When none has arrived for the timeout, something between Prometheus and here is broken (or not
running), and no other alert would reach anyone either: the switch says so, once, then again
every ``remind_every`` seconds while it lasts, and says when the Watchdog is back.

Before the first Watchdog ever arrives the timeout counts from the start, so that a pipeline that
never worked is reported like one that stopped; with the shipped intervals the first Watchdog
arrives well within the default 180 s (Prometheus fires it at its first evaluation that finds
Alertmanager; the route's group_wait is 0 s).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

# Events: (kind, text) to the callback. "ok" once at the first Watchdog; "broken" when the
# timeout passes; "still_broken" as a reminder; "recovered" when it comes back. Events are said
# in the order of the changes they report: each change and its event happen under one lock
# (``_saying``), so that a Watchdog arriving while the alarm is being said is said to have
# recovered after it, never before (the last word printed and the gauge stay right). The
# callback must not call back into the switch.
Event = Callable[[str, str], None]


class DeadMansSwitch:
    def __init__(
        self,
        timeout: float,
        on_event: Event,
        *,
        remind_every: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.timeout = timeout
        self._on_event = on_event
        self._remind_every = remind_every
        self._clock = clock
        self._lock = threading.Lock()  # the state, for readers (state, last_age)
        self._saying = threading.Lock()  # a change and its event, in order
        self._started = clock()
        self._last: float | None = None  # when the last Watchdog arrived
        self._broken_since: float | None = None
        self._next_reminder = 0.0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="deadmansswitch", daemon=True)

    @property
    def state(self) -> str:
        """waiting (none yet, within the timeout), ok or broken."""
        with self._lock:
            if self._broken_since is not None:
                return "broken"
            return "ok" if self._last is not None else "waiting"

    def last_age(self) -> float | None:
        """Seconds since the last Watchdog, None before the first."""
        with self._lock:
            return None if self._last is None else self._clock() - self._last

    def received(self) -> None:
        """A Watchdog arrived."""
        with self._saying:
            self._received()

    def _received(self) -> None:
        now = self._clock()
        with self._lock:
            first = self._last is None
            broken_since = self._broken_since
            reference = self._started if first else self._last
            self._last = now
            self._broken_since = None
        if broken_since is not None:
            gap = (
                f"the first, {now - reference:.0f} s after the notifier started"
                if first
                else f"again after {now - reference:.0f} s without it"
            )
            self._on_event(
                "recovered",
                f"alerting pipeline recovered: Watchdog received from Alertmanager ({gap})",
            )
        elif first:
            self._on_event("ok", "alerting pipeline OK: Watchdog received from Alertmanager")

    def check(self) -> None:
        """Fire the alarm (or its reminder) when it is due; called by the thread."""
        with self._saying:
            self._check()

    def _check(self) -> None:
        now = self._clock()
        with self._lock:
            never = self._last is None
            silent_for = now - (self._started if never else self._last)
            if self._broken_since is None:
                if silent_for < self.timeout:
                    return
                self._broken_since = now
                kind = "broken"
            elif now >= self._next_reminder:
                kind = "still_broken"
            else:
                return
            self._next_reminder = now + self._remind_every
        since = (
            f"in the {silent_for:.0f} s since the notifier started"
            if never
            else f"for {silent_for:.0f} s"
        )
        self._on_event(
            kind,
            f"ALERTING PIPELINE BROKEN: no Watchdog from Alertmanager {since} (--watchdog-timeout "
            f"{self.timeout:g} s). Alerts may not reach anyone: check that Prometheus runs, loads "
            "the rules (the Watchdog alert) and reaches Alertmanager, and that Alertmanager runs "
            "and its deadmansswitch route posts to this notifier's /watchdog.",
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def _run(self) -> None:
        step = min(1.0, self.timeout / 4)
        while not self._stopping.wait(step):
            self.check()
