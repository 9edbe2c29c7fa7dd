"""The exporter's HTTP server: prometheus_client's ``start_http_server`` (a thread per request,
IPv4 or IPv6 by the address, the text format or OpenMetrics as the scraper asks, gzip when
accepted), with the exporter's routes: /metrics, a landing page on /, and 404 elsewhere
(prometheus_client's app alone serves the metrics on any path). Request lines are not logged."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from loguru import logger
from prometheus_client import make_wsgi_app, start_http_server

from . import __version__

LANDING = f"""<html><head><title>llm-vigil exporter</title></head><body>
<h1>llm-vigil exporter {__version__}</h1><p><a href="/metrics">Metrics</a></p></body></html>
""".encode()
TEXT = "text/plain; charset=utf-8"
# A connection that sends nothing for this long is closed (its thread ends).
CLIENT_TIMEOUT_S = 60.0


def metrics_app(registry) -> Callable:
    """The WSGI app: prometheus_client's on /metrics, the landing page on /, 404 elsewhere."""
    metrics = make_wsgi_app(registry)

    def app(environ, start_response) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        if path == "/metrics":
            try:
                return metrics(environ, start_response)
            except Exception:  # noqa: BLE001 - the collectors are guarded; this is a bug
                logger.exception("rendering /metrics failed")
                return _send(
                    start_response,
                    "500 Internal Server Error",
                    b"rendering the metrics failed; see the exporter's log\n",
                    TEXT,
                )
        if path == "/":
            return _send(start_response, "200 OK", LANDING, "text/html; charset=utf-8")
        return _send(start_response, "404 Not Found", b"not found: try /metrics\n", TEXT)

    return app


def _send(start_response, status: str, body: bytes, content_type: str) -> list[bytes]:
    start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body)))])
    return [body]


def start_server(host: str, port: int, registry, client_timeout: float = CLIENT_TIMEOUT_S):
    """Listen on host:port and serve in a daemon thread; OSError when the address cannot be had.

    The returned server has ``server_port``, ``shutdown()`` and ``server_close()``."""
    server, _thread = start_http_server(port, host, registry)
    # Routed from here on (a request that came first got prometheus_client's plain app: the
    # metrics, whatever its path).
    server.set_app(metrics_app(registry))
    server.RequestHandlerClass = _with_timeout(server.RequestHandlerClass, client_timeout)
    return server


def _with_timeout(handler: type, seconds: float) -> type:
    """prometheus_client's handler, but a client that sends nothing for ``seconds`` is dropped:
    its handler waits with no limit, so idle or stalled clients would pile up threads."""

    class TimedHandler(handler):
        timeout = seconds

        def handle(self) -> None:
            try:
                super().handle()
            except TimeoutError:  # nothing came in time: drop the connection
                self.close_connection = True

    return TimedHandler
