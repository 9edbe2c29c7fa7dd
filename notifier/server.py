"""The notifier's HTTP server (the standard library's ThreadingHTTPServer, a thread per request):

    POST /alerts     Alertmanager's webhook for every alert: printed, logged, relayed (to
                     every relay, or to those named: /alerts?relay=dingtalk,feishu)
    POST /watchdog   the deadmansswitch route: the Watchdog alert, once a minute
    GET  /health     liveness: 200 and the dead man's switch's state while the server runs
    GET  /metrics    the notifier's own metrics (Prometheus text format)

A webhook is answered 200 as soon as it is queued for the relays and its lines for the console
(the relays send, and stdout is written, in the background: neither holds up the answer); a
body that is not JSON, or not Alertmanager's payload, 400 with a JSON error; another path 404;
another method 405 with Allow. Request lines are not logged."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from loguru import logger
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .message import Notification, PayloadError, parse

# Path -> endpoint name (the alertmanager.yml receivers post to these).
WEBHOOKS = {"/alerts": "alerts", "/watchdog": "watchdog"}
READ_ONLY = ("/health", "/metrics", "/")
# Alertmanager's payload for thousands of alerts stays far below this.
MAX_BODY_BYTES = 16 * 1024 * 1024
CLIENT_TIMEOUT_S = 60.0


class Handlers:
    """What the server calls: the notifier's side of each route."""

    def __init__(
        self,
        on_notification: Callable[[str, Notification, tuple[str, ...] | None], None],
        health: Callable[[], dict[str, Any]],
        metrics_registry,
    ):
        self.on_notification = on_notification
        self.health = health
        self.metrics_registry = metrics_registry


def make_server(host: str, port: int, handlers: Handlers) -> ThreadingHTTPServer:
    """Bound and listening (OSError when the address cannot be had); serve it in a thread."""

    class Handler(BaseHTTPRequestHandler):
        server_version = "vigil-notifier"
        timeout = CLIENT_TIMEOUT_S

        def do_POST(self) -> None:  # noqa: N802 - the standard library's name
            url = urlsplit(self.path)
            endpoint = WEBHOOKS.get(url.path)
            if endpoint is None:
                self._not_here(url.path, "POST")
                return
            relays = _relays(url.query)
            body = self._body()
            if body is None:
                return
            try:
                notification = parse(json.loads(body))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                self._json(HTTPStatus.BAD_REQUEST, {"error": f"the body is not JSON: {exc}"})
                return
            except PayloadError as exc:
                self._json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
                return
            try:
                handlers.on_notification(endpoint, notification, relays)
            except Exception:  # noqa: BLE001 - answer 500 so that Alertmanager tries again
                logger.bind(endpoint=endpoint).exception("handling a notification failed")
                self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "see the notifier's log"})
                return
            self._json(HTTPStatus.OK, {"status": "ok", "alerts": len(notification.alerts)})

        def do_GET(self) -> None:  # noqa: N802
            path = urlsplit(self.path).path
            if path == "/health":
                self._json(HTTPStatus.OK, {"status": "ok", **handlers.health()})
            elif path == "/metrics":
                self._send(
                    HTTPStatus.OK, generate_latest(handlers.metrics_registry), CONTENT_TYPE_LATEST
                )
            elif path == "/":
                text = (
                    "llm-vigil notifier: Alertmanager webhooks on POST /alerts and POST "
                    "/watchdog; GET /health, GET /metrics\n"
                )
                self._send(HTTPStatus.OK, text.encode(), "text/plain; charset=utf-8")
            else:
                self._not_here(path, self.command)

        def _other(self) -> None:
            self._not_here(urlsplit(self.path).path, self.command)

        do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _other  # noqa: N815

        do_HEAD = do_GET  # noqa: N815 - the same answers, without the body (_send)

        def _not_here(self, path: str, method: str) -> None:
            if path in WEBHOOKS:
                allowed = "POST"
            elif path in READ_ONLY:
                allowed = "GET"
            else:
                self._json(HTTPStatus.NOT_FOUND, {"error": f"no such path: {path}"})
                return
            self._json(
                HTTPStatus.METHOD_NOT_ALLOWED,
                {"error": f"{method} is not allowed on {path}; use {allowed}"},
                headers={"Allow": allowed},
            )

        def _body(self) -> bytes | None:
            length = self.headers.get("Content-Length")
            if length is None:
                self._json(HTTPStatus.LENGTH_REQUIRED, {"error": "Content-Length is required"})
                return None
            try:
                size = int(length)
            except ValueError:
                size = -1
            if size < 0:
                self._json(HTTPStatus.BAD_REQUEST, {"error": "Content-Length is not a number"})
                return None
            if size > MAX_BODY_BYTES:
                self.close_connection = True
                self._json(
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                    {"error": f"the body is over {MAX_BODY_BYTES} bytes"},
                )
                return None
            return self.rfile.read(size)

        def _json(self, status: HTTPStatus, payload: dict[str, Any], headers=None) -> None:
            self._send(status, json.dumps(payload).encode(), "application/json", headers)

        def _send(self, status: HTTPStatus, body: bytes, content_type: str, headers=None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def handle(self) -> None:
            try:
                super().handle()
            except TimeoutError:  # a client that sent nothing in time: drop it
                self.close_connection = True

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True

    # IPv6 addresses listen as such (ThreadingHTTPServer is IPv4 unless told).
    if ":" in host:
        import socket

        Server.address_family = socket.AF_INET6
    return Server((host, port), Handler)


def _relays(query: str) -> tuple[str, ...] | None:
    """The relays a webhook URL names (?relay=a,b or ?relay=a&relay=b); None: every relay."""
    values = parse_qs(query).get("relay")
    if values is None:
        return None
    return tuple(name.strip() for value in values for name in value.split(",") if name.strip())


def serve_in_thread(server: ThreadingHTTPServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    thread.start()
    return thread
