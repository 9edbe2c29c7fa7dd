"""The exporter's HTTP server: ``GET /metrics`` (gzip when asked) and a landing page.

A threading server, so that a slow client never holds another scrape; request lines are not
logged (Prometheus scrapes every few seconds)."""

from __future__ import annotations

import gzip
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from loguru import logger

from . import __version__
from .exposition import CONTENT_TYPE, render

LANDING = f"""<html><head><title>llm-vigil exporter</title></head><body>
<h1>llm-vigil exporter {__version__}</h1><p><a href="/metrics">Metrics</a></p></body></html>
""".encode()


def make_server(host: str, port: int, registry) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        server_version = f"llm-vigil-exporter/{__version__}"
        protocol_version = "HTTP/1.1"  # keep-alive: Prometheus reuses its connection
        timeout = 60  # an idle or stalled client's connection (and thread) is closed

        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                try:
                    body = render(registry)
                except Exception:  # noqa: BLE001 - the collectors are guarded; this is a bug
                    logger.exception("rendering /metrics failed")
                    self._send(500, b"rendering the metrics failed; see the exporter's log\n",
                               "text/plain; charset=utf-8")
                    return
                self._send(200, body, CONTENT_TYPE, compress=True)
            elif path == "/":
                self._send(200, LANDING, "text/html; charset=utf-8")
            else:
                self._send(404, b"not found: try /metrics\n", "text/plain; charset=utf-8")

        def _send(self, status: int, body: bytes, content_type: str,
                  compress: bool = False) -> None:
            gzipped = compress and "gzip" in self.headers.get("Accept-Encoding", "")
            if gzipped:
                body = gzip.compress(body, compresslevel=1)  # cheap; text shrinks 8x anyway
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            if gzipped:
                self.send_header("Content-Encoding", "gzip")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args) -> None:  # noqa: A002
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def serve_in_thread(server: ThreadingHTTPServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    thread.start()
    return thread
