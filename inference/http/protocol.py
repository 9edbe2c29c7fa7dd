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
- A response sent before the request body has all arrived (a 413, a 408, a route that reads
  no body) leaves uvicorn reading and dropping the rest for as long as the client cares to
  trickle it (``handle_events`` skips ``Data`` once the response is done). Here the rest must
  arrive within ``--header-timeout`` too, or the connection is closed.

httptools is not used even when installed: these hooks are written against h11's states.
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
import sys
from typing import Any

import h11
from h11._connection import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..api.errors import ApiError
from .connections import ConnectionGuard

MAX_HEAD_BYTES = DEFAULT_MAX_INCOMPLETE_EVENT_SIZE  # h11's limit on a head still incomplete
_UVICORN_INVALID = "Invalid HTTP request received."


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
        self._refused = False

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
        if self._refused:
            return
        if self.conn.their_state is h11.IDLE:
            self._head_bytes += len(data)
            if self._head_timer is None:  # the first byte of a request on a kept-alive one
                self._arm_head_timer()
        super().data_received(data)
        self._track()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        self.guard.forget(self)
        super().connection_lost(exc)

    # ---- uvicorn's hooks ------------------------------------------------------------------

    def on_response_complete(self) -> None:
        super().on_response_complete()  # runs a pipelined request already received
        if self._draining_unread_body() and self._head_timer is None:
            self._arm_head_timer()
        self._track()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a head h11 cannot read, called from within its except block."""
        exc = sys.exc_info()[1]
        status = getattr(exc, "error_status_hint", 400)
        reason = str(exc or msg)[:200]
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
        self.guard.log(
            "invalid_http_request" if status != 431 else "request_head_too_large",
            "answered {} to {}: {}",
            status,
            self._peer(),
            reason,
            client=self._peer(),
            status=status,
        )
        self._close_with(error)

    # ---- the head deadline ----------------------------------------------------------------

    def give_way(self) -> None:
        """Closed to make room for a new connection at the cap (the guard already let go)."""
        self._disarm_head_timer()
        if self.transport.is_closing():
            return
        self.guard.log(
            "closed_for_room",
            "closed the connection from {} (waiting for a request head, {} bytes of it "
            "received) to make room for a new one: {} connections open (--max-connections)",
            self._peer(),
            self._head_bytes,
            self.guard.max_connections,
            client=self._peer(),
        )
        if self._head_bytes:
            self._close_with(
                ApiError(
                    503,
                    "the server is at its connection limit and this connection had not sent "
                    "its request head; retry",
                    error_type="server_unavailable",
                    code="too_many_connections",
                    headers={"Retry-After": "1"},
                )
            )
        else:
            self.transport.close()

    def _track(self) -> None:
        """After input or a response: waiting for a head, or busy with a request."""
        if self.transport.is_closing():
            self._disarm_head_timer()
        elif self.conn.their_state is h11.IDLE:
            self.guard.await_head(self)
        elif self._draining_unread_body():
            pass  # under the deadline on_response_complete armed
        else:  # the head is complete: a request is in progress
            self._disarm_head_timer()
            self._head_bytes = 0
            self.guard.busy(self)

    def _draining_unread_body(self) -> bool:
        """Answered while the client still sends a body that nobody will read."""
        return self.conn.our_state is h11.DONE and self.conn.their_state is h11.SEND_BODY

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

    def _close_with(self, error: ApiError) -> None:
        self.transport.write(error_bytes(error))
        self.transport.close()

    def _peer(self) -> str:
        if not self.client:
            return "an unknown peer"
        return f"{self.client[0]}:{self.client[1]}"


def protocol_class(guard: ConnectionGuard) -> type[GuardedH11Protocol]:
    """The protocol class to hand uvicorn (``uvicorn.Config(http=...)``), bound to ``guard``."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"guard": guard})
