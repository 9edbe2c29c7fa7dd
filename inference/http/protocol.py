"""uvicorn's h11 protocol with the defences uvicorn leaves out, and the server's JSON errors.

What uvicorn 0.54 does (uvicorn/protocols/http/h11_impl.py), and what this adds:

- No deadline for the request head. ``connection_made`` arms nothing; the keep-alive timer is
  armed only after a response (``on_response_complete``) and cancelled by any byte received
  (``data_received``). A connection that sends nothing, or one header byte a second, stays open
  for ever. Here a connection must send a complete head within ``--header-timeout`` of opening,
  or of the first byte of its next request on a kept-alive connection; past it, it is closed:
  silently if it sent nothing (as nginx does), with a 408 if the request had begun.
- No cap on connections. ``limit_concurrency`` is checked only once a request head is
  complete (``handle_events``), answers plain-text 503s and never closes an idle socket. Here
  the ``ConnectionGuard`` caps open connections at ``--max-connections`` when they open.
- A request head h11 cannot read (``RemoteProtocolError``, with its ``error_status_hint``:
  431 once the incomplete head passes h11's 16 KiB, 400 otherwise) gets uvicorn's
  ``send_400_response``: a 400 in plain text, "Invalid HTTP request received.", whatever the
  hint, and one warning line per request. Here it gets the hinted status with the API's
  OpenAI-shaped JSON error, and the warnings are summed per interval.
- No deadline for the request body either: a client that sends its head and then nothing
  holds its connection, as a request in progress, until the request's deadline. Here each
  piece of the body must come within ``--body-timeout`` of the one before (or of the head),
  or the connection is closed with a 408 (``request_body_timeout``). A connection whose body
  has stalled for a second may also give way at the cap (``connections.py``).
- A response sent before the request body has all arrived (a 413, a 408, a route that reads
  no body) leaves uvicorn reading and dropping the rest for as long as the client cares to
  trickle it (``handle_events`` skips ``Data`` once the response is done). Here the rest must
  arrive within ``--header-timeout`` too, or the connection is closed.
- A pipelined request whose head had only begun when the previous response ended falls under
  uvicorn's keep-alive timer (5 s, closed without a word). Here it gets the head deadline.
- h11's message for a head it cannot read quotes the client's bytes (a header line, with its
  value: a token); uvicorn's own log line does not, but a message built from it would. Here
  the answer and the log name the fault in a fixed phrase and never quote the request.
- An error answer is followed by a lingering close, as nginx's: the server stops writing and
  reads and drops what still comes for up to ``LINGER_S``, so that a client still sending
  reads the answer instead of a reset.

httptools is not used even when installed: these hooks are written against h11's states.
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
import sys
import time
from typing import Any

import h11
from h11._connection import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..api.errors import CLOSED_BY_SERVER, ApiError
from .connections import ConnectionGuard

MAX_HEAD_BYTES = DEFAULT_MAX_INCOMPLETE_EVENT_SIZE  # h11's limit on a head still incomplete
LINGER_S = 2.0  # after an error answer: how long what the client still sends is read and dropped
_UVICORN_INVALID = "Invalid HTTP request received."

# h11's messages, by their fixed beginning, and what the server says instead: the rest of
# h11's message quotes the request's bytes (a header line may carry a token), never repeated.
_HTTP_FAULTS = (
    ("illegal request line", "the request line is malformed"),
    ("no request line received", "the request line is missing"),
    ("illegal header line", "a header line is malformed"),
    ("continuation line at start of headers", "a header line is malformed"),
    ("Illegal header name", "a header name has characters HTTP does not allow"),
    ("Illegal header value", "a header value has characters HTTP does not allow"),
    ("Illegal method characters", "the method has characters HTTP does not allow"),
    ("Illegal target characters", "the request target has characters HTTP does not allow"),
    ("Missing mandatory Host", "the Host header is missing"),
    ("Found multiple Host", "there is more than one Host header"),
    ("conflicting Content-Length", "the Content-Length headers disagree"),
    ("bad Content-Length", "the Content-Length header is not a number"),
    ("multiple Transfer-Encoding", "there is more than one Transfer-Encoding header"),
    ("Only Transfer-Encoding: chunked", "the only Transfer-Encoding supported is chunked"),
    ("illegal chunk header", "a chunk header of the body is malformed"),
    ("malformed chunk footer", "a chunk of the body does not end as it should"),
    ("peer closed connection", "the connection ended within a request"),
    ("peer unexpectedly closed", "the connection ended within a request"),
)


def http_fault(exc: BaseException | None) -> str:
    """What is wrong with a request h11 could not read, in a fixed phrase (see _HTTP_FAULTS)."""
    text = str(exc or "")
    for start, phrase in _HTTP_FAULTS:
        if text.startswith(start):
            return phrase
    return "it cannot be read"


class _WithoutInvalidRequestLines(logging.Filter):
    """uvicorn logs a warning per unreadable request before answering it; the protocol below
    logs them itself, summed per interval."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != _UVICORN_INVALID


_PROTOCOL_LOGGER = logging.getLogger("uvicorn.error.http")
_PROTOCOL_LOGGER.addFilter(_WithoutInvalidRequestLines())


def error_bytes(error: ApiError) -> bytes:
    """A whole HTTP/1.1 response carrying ``error`` as the API's JSON, closing the connection."""
    body = json.dumps(error.body()).encode()
    try:
        phrase = http.HTTPStatus(error.status).phrase
    except ValueError:
        phrase = ""
    head = [
        f"HTTP/1.1 {error.status} {phrase}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
        *(f"{name}: {value}" for name, value in error.headers.items()),
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


class GuardedH11Protocol(H11Protocol):
    """One client connection. ``guard`` is set on the subclass ``protocol_class`` makes."""

    guard: ConnectionGuard

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.logger = _PROTOCOL_LOGGER
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0  # bytes of the awaited request head received so far
        self._body_timer: asyncio.TimerHandle | None = None
        self.body_input_at = 0.0  # time.monotonic() of the last piece of a request body
        self._refused = False
        self._lingering = False  # answered and closing: what comes is dropped

    # ---- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if not self.guard.admit(self):
            self._refused = True
            guard = self.guard
            self._close_with(
                ApiError(
                    503,
                    f"the server holds {guard.max_connections} connections (its limit, "
                    "--max-connections) and every one has a request in progress; retry later",
                    error_type="server_unavailable",
                    code="too_many_connections",
                    headers={"Retry-After": "1"},
                )
            )
            guard.log(
                "connection_limit",
                "refused a connection from {}: {} connections open (--max-connections), "
                "each with a request in progress",
                self._peer(),
                guard.max_connections,
                client=self._peer(),
            )
            return
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        if self._refused or self._lingering:
            return
        if self.conn.their_state is h11.IDLE:
            self._head_bytes += len(data)
            if self._head_timer is None:  # the first byte of a request on a kept-alive one
                self._arm_head_timer()
        super().data_received(data)
        self._track(received=True)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        self._disarm_body_timer()
        self.guard.forget(self)
        super().connection_lost(exc)

    # ---- uvicorn's hooks ------------------------------------------------------------------

    def on_response_complete(self) -> None:
        super().on_response_complete()  # runs a pipelined request already received
        if self.transport.is_closing():
            return
        if self._draining_unread_body() and self._head_timer is None:
            self._arm_head_timer()
        pending = len(self.conn.trailing_data[0])
        if self.conn.their_state is h11.IDLE and pending:
            # Part of the next request's head came while this one was answered: under the
            # head deadline from now, not uvicorn's keep-alive timer, which closes silently.
            self._unset_keepalive_if_required()
            self._head_bytes = pending
            self._arm_head_timer()
        self._track()

    def timeout_keep_alive_handler(self) -> None:
        """uvicorn's keep-alive timer: nothing came within 5 s of the last response."""
        if not self.transport.is_closing():
            self.guard.count("keep_alive_timeout")
        super().timeout_keep_alive_handler()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a head h11 cannot read, called from within its except block."""
        exc = sys.exc_info()[1]
        status = getattr(exc, "error_status_hint", 400)
        reason = http_fault(exc)
        if status == 431:
            error = ApiError(
                431,
                f"the request head (request line and headers) is over {MAX_HEAD_BYTES} bytes, "
                "the server's limit; send fewer or shorter headers",
                code="request_header_fields_too_large",
            )
        else:
            error = ApiError(
                status,
                f"the request is not valid HTTP/1.1: {reason}",
                code="invalid_http_request",
            )
            reason = f"not valid HTTP/1.1: {reason}"
        self.guard.log(
            "invalid_http_request" if status != 431 else "request_head_too_large",
            "answered {} to {}: {}",
            status,
            self._peer(),
            reason if status != 431 else f"a request head over {MAX_HEAD_BYTES} bytes",
            client=self._peer(),
            status=status,
        )
        self._close_with(error)

    # ---- the head deadline ----------------------------------------------------------------

    def give_way(self) -> None:
        """Closed to make room for a new connection at the cap (the guard already let go)."""
        self._disarm_head_timer()
        self._disarm_body_timer()
        if self.transport.is_closing() or self._lingering:
            self.transport.close()
            return
        receiving = self._receiving_body()
        self.guard.log(
            "closed_for_room",
            "closed the connection from {} ({}) to make room for a new one: {} connections "
            "open (--max-connections)",
            self._peer(),
            "its request body stalled"
            if receiving
            else f"waiting for a request head, {self._head_bytes} bytes of it received",
            self.guard.max_connections,
            client=self._peer(),
        )
        if receiving:
            error = ApiError(
                503,
                "the server is at its connection limit and this request's body had stopped "
                "arriving; retry",
                error_type="server_unavailable",
                code="too_many_connections",
                headers={"Retry-After": "1"},
            )
            self._tell_the_request(error)
            self._close_with(error, linger=False)
        elif self._head_bytes:
            self._close_with(
                ApiError(
                    503,
                    "the server is at its connection limit and this connection had not sent "
                    "its request head; retry",
                    error_type="server_unavailable",
                    code="too_many_connections",
                    headers={"Retry-After": "1"},
                ),
                linger=False,
            )
        else:
            self.transport.close()

    def _track(self, received: bool = False) -> None:
        """After input or a response: waiting for a head, receiving a body, or busy."""
        if self.transport.is_closing() or self._lingering:
            self._disarm_head_timer()
            self._disarm_body_timer()
        elif self.conn.their_state is h11.IDLE:
            self._disarm_body_timer()
            self.guard.await_head(self, begun=self._head_bytes > 0)
        elif self._draining_unread_body():
            self._disarm_body_timer()  # under the deadline on_response_complete armed
        elif self._receiving_body():
            self._disarm_head_timer()
            self._head_bytes = 0
            if received or self._body_timer is None:
                self.body_input_at = time.monotonic()
                self._arm_body_timer()
            self.guard.receive_body(self)
        else:  # the request is all in: it is being answered
            self._disarm_head_timer()
            self._disarm_body_timer()
            self._head_bytes = 0
            self.guard.busy(self)

    def _receiving_body(self) -> bool:
        """The request's body is still arriving and nothing has been answered yet."""
        return self.conn.their_state is h11.SEND_BODY and self.conn.our_state is h11.SEND_RESPONSE

    def _draining_unread_body(self) -> bool:
        """Answered while the client still sends a body that nobody will read."""
        return self.conn.our_state is h11.DONE and self.conn.their_state is h11.SEND_BODY

    def _arm_body_timer(self) -> None:
        self._disarm_body_timer()
        self._body_timer = self.loop.call_later(self.guard.body_timeout, self._body_timed_out)

    def _disarm_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_timed_out(self) -> None:
        self._body_timer = None
        if self.transport.is_closing() or self._lingering or not self._receiving_body():
            return
        cycle = self.cycle
        if self.flow.read_paused or (cycle is not None and cycle.waiting_for_100_continue):
            # The server is the one waiting: the route has not read what came, or not yet
            # asked for the body a client sends only once told to (Expect: 100-continue).
            self._arm_body_timer()
            return
        timeout = self.guard.body_timeout
        self.guard.log(
            "slow_request_body",
            "closed the connection from {}: its request body stopped arriving (nothing of it "
            "for {:g} s, --body-timeout)",
            self._peer(),
            timeout,
            client=self._peer(),
        )
        error = ApiError(
            408,
            f"the request body stopped arriving: nothing of it came for {timeout:g} s (the "
            "server's --body-timeout)",
            error_type="timeout",
            code="request_body_timeout",
        )
        self._tell_the_request(error)
        self._close_with(error)

    def _tell_the_request(self, error: ApiError) -> None:
        """Leave ``error`` where the request's handler finds it: it sees only a disconnect."""
        cycle = self.cycle
        if cycle is not None:
            cycle.scope[CLOSED_BY_SERVER] = error  # type: ignore[literal-required]
            # Gone for the handler now (the connection lingers for a while yet): what it would
            # send is dropped, as for a client that left.
            cycle.disconnected = True
            cycle.message_event.set()

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        self._head_timer = self.loop.call_later(self.guard.header_timeout, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        timeout = self.guard.header_timeout
        if self.transport.is_closing():
            return
        if self._draining_unread_body():
            self.guard.log(
                "slow_unread_body",
                "closed the connection from {}: the rest of a request body that was already "
                "answered did not arrive within {:g} s (--header-timeout)",
                self._peer(),
                timeout,
                client=self._peer(),
            )
            self.transport.close()
            return
        if self.conn.their_state is not h11.IDLE:
            return
        if not self._head_bytes:
            self.guard.log(
                "idle_connection",
                "closed the connection from {}: no request within {:g} s (--header-timeout)",
                self._peer(),
                timeout,
                client=self._peer(),
            )
            self.transport.close()
            return
        self.guard.log(
            "slow_request_head",
            "closed the connection from {}: its request head was not complete within {:g} s "
            "(--header-timeout; {} bytes received)",
            self._peer(),
            timeout,
            self._head_bytes,
            client=self._peer(),
        )
        self._close_with(
            ApiError(
                408,
                f"the request head (request line and headers) did not arrive within {timeout:g} s "
                "(the server's --header-timeout)",
                error_type="timeout",
                code="request_head_timeout",
            )
        )

    def _close_with(self, error: ApiError, linger: bool = True) -> None:
        """Answer ``error`` and close: at once, or after a lingering close (LINGER_S), reading
        and dropping what the client still sends, so that it reads the answer rather than a
        reset (a socket closed with unread input resets the connection)."""
        self._disarm_head_timer()
        self._disarm_body_timer()
        self.transport.write(error_bytes(error))
        if not linger or not self.transport.can_write_eof() or self._refused:
            self.transport.close()
            return
        self._lingering = True
        self.transport.write_eof()
        self.guard.await_head(self, begun=False)  # the first to give way at the cap
        self.loop.call_later(LINGER_S, self.transport.close)

    def _peer(self) -> str:
        if not self.client:
            return "an unknown peer"
        return f"{self.client[0]}:{self.client[1]}"


def protocol_class(guard: ConnectionGuard) -> type[GuardedH11Protocol]:
    """The protocol class to hand uvicorn (``uvicorn.Config(http=...)``), bound to ``guard``."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"guard": guard})
