"""How many client connections the server holds, and which one gives way at the limit.

Every connection holds a file descriptor, and a process that runs out of them can neither
accept a client nor open a file. The cap is therefore sized to the descriptor limit
(``ulimit -n``), raised towards its hard limit as servers written in Go do; and at the cap a
connection without a request in progress is closed to make room, so that a crowd of slow or
silent ones cannot lock real clients out. Which one, in this order: one that has sent nothing
of a request (new, or kept alive after a response; the longest waiting first), then one still
sending its head (likewise), then one whose request body has not moved for a second (the
longest stalled first). Only when every connection has a request in progress, its body in or
still arriving, is a new one refused.
"""

from __future__ import annotations

import resource
import time
from typing import Any, Protocol

from loguru import logger

from ..config import ConfigError
from ..telemetry.refusals import RefusalLog

DEFAULT_MAX_CONNECTIONS = 1000
# The listen queue, and what asyncio accepts in one turn of the loop before the protocol can
# refuse any of them: that many connections may hold descriptors beyond the cap for a moment.
ACCEPT_BACKLOG = 256
# Descriptors the process needs besides its clients: the model's files while it loads, the
# metrics files, image downloads (one per worker thread), the OTLP exporter, its own output.
PROCESS_DESCRIPTORS = 128
RESERVED_DESCRIPTORS = ACCEPT_BACKLOG + PROCESS_DESCRIPTORS
_LIMIT_FIX = "raise the limit (ulimit -n; systemd LimitNOFILE=; docker run --ulimit nofile=N)"


def plan_connections(requested: int | None, soft: int, hard: int) -> tuple[int, int]:
    """The connection cap and the soft descriptor limit it needs, from ``--max-connections``
    (None: the default, lowered to what the limit holds) and the current limits.

    ConfigError when a cap that was asked for cannot fit under the hard limit, or when the limit
    leaves no room at all."""
    infinite = resource.RLIM_INFINITY
    wanted = (requested or DEFAULT_MAX_CONNECTIONS) + RESERVED_DESCRIPTORS
    reachable = wanted if hard == infinite else min(wanted, hard)
    new_soft = soft if soft == infinite or soft >= wanted else max(soft, reachable)
    room = (wanted if new_soft == infinite else new_soft) - RESERVED_DESCRIPTORS
    if requested is None:
        if room < 1:
            raise ConfigError(
                f"this process may open only {max(soft, reachable)} files (ulimit -n), which "
                f"leaves no room for client connections beside the {RESERVED_DESCRIPTORS} the "
                f"server keeps for itself; {_LIMIT_FIX} to at least {RESERVED_DESCRIPTORS + 64}"
            )
        return min(DEFAULT_MAX_CONNECTIONS, room), new_soft
    if requested > room:
        raise ConfigError(
            f"--max-connections {requested} needs {wanted} file descriptors "
            f"({RESERVED_DESCRIPTORS} kept for the server itself), but this process may open "
            f"at most {max(soft, reachable)} (ulimit -n); lower --max-connections to at most "
            f"{max(room, 0)}, or {_LIMIT_FIX}"
        )
    return requested, new_soft


def reserve_descriptors(requested: int | None) -> int:
    """The connection cap for this process; the soft descriptor limit is raised to hold it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    cap, new_soft = plan_connections(requested, soft, hard)
    if new_soft != soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))
    return cap


BODY_STALLED_S = 1.0  # a body with nothing new for this long may give way at the cap


class Connection(Protocol):
    """What the guard needs of a connection (the protocol object of ``protocol.py``)."""

    body_input_at: float  # when the last piece of its request body came (time.monotonic)

    def give_way(self) -> None: ...


class ConnectionObserver(Protocol):
    """Where the guard reports (InferenceMetrics): the count of open connections, and each one
    closed or refused by the server, by reason (the log sums them; the counter stays exact)."""

    def connections_open(self, count: int) -> None: ...

    def connection_closed(self, reason: str) -> None: ...


class ConnectionGuard:
    """The open connections of one server, and where each one stands.

    Used from the event loop only. Each line (``idle``, ``heads``, ``bodies``) is insertion
    ordered: the longest there first.
    """

    def __init__(
        self,
        max_connections: int,
        header_timeout: float,
        observer: ConnectionObserver | None = None,
        body_timeout: float = 30.0,
    ):
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.observer = observer
        self._logs: dict[str, RefusalLog] = {}  # one per reason: each kind logged in full once
        self.open: set[Connection] = set()
        self.idle: dict[Connection, None] = {}  # nothing of a request received
        self.heads: dict[Connection, None] = {}  # part of a request head received
        self.bodies: dict[Connection, None] = {}  # a request body arriving, nothing answered

    def admit(self, connection: Connection) -> bool:
        """Take a new connection, closing one without a request in progress at the cap (see
        the module's docstring); False when every open connection has one (the new one is
        then refused)."""
        if len(self.open) >= self.max_connections:
            victim = self._victim()
            if victim is None:
                return False
            self.forget(victim)
            victim.give_way()
        self.open.add(connection)
        self.idle[connection] = None
        self._count_open()
        return True

    def _victim(self) -> Connection | None:
        for line in (self.idle, self.heads):
            for connection in line:
                return connection
        now = time.monotonic()
        stalled = [c for c in self.bodies if now - c.body_input_at >= BODY_STALLED_S]
        return min(stalled, key=lambda c: c.body_input_at, default=None)

    def await_head(self, connection: Connection, begun: bool = False) -> None:
        """The connection waits for a request head (``begun``: part of it came); it keeps its
        place in its line if it was there already."""
        if connection not in self.open:
            return
        wanted, other = (self.heads, self.idle) if begun else (self.idle, self.heads)
        other.pop(connection, None)
        self.bodies.pop(connection, None)
        wanted.setdefault(connection, None)

    def receive_body(self, connection: Connection) -> None:
        """The connection's request head is in and its body arriving; nothing is answered."""
        if connection not in self.open:
            return
        self.idle.pop(connection, None)
        self.heads.pop(connection, None)
        self.bodies.setdefault(connection, None)

    def busy(self, connection: Connection) -> None:
        """A request is in progress on the connection: it is not closed to make room."""
        self.idle.pop(connection, None)
        self.heads.pop(connection, None)
        self.bodies.pop(connection, None)

    def forget(self, connection: Connection) -> None:
        if connection in self.open:
            self.open.discard(connection)
            self._count_open()
        self.busy(connection)

    @property
    def waiting(self) -> list[Connection]:
        """The connections without a request in progress, in the order they would give way
        (those with a stalled body aside)."""
        return [*self.idle, *self.heads]

    def _count_open(self) -> None:
        if self.observer is not None:
            self.observer.connections_open(len(self.open))

    def count(self, reason: str) -> None:
        """A connection the server closed in the ordinary way (counted, not logged)."""
        if self.observer is not None:
            self.observer.connection_closed(reason)

    def log(self, reason: str, message: str, *args: Any, **fields: Any) -> None:
        """A warning logged in full the first time per interval for each reason, and summed
        with the others of that interval (RefusalLog): a flood of connections writes a few
        lines, not one each."""
        self.count(reason)

        def emit() -> None:
            logger.bind(reason=reason, **fields).warning(message, *args)

        self._logs.setdefault(reason, RefusalLog()).refused(emit, reason)

    def flush(self) -> None:
        """Log what the current intervals counted (at shutdown)."""
        for log in self._logs.values():
            log.flush()
