"""``python -m inference``: start the instrumented inference server;
``python -m inference doctor``: check the environment it would start in."""

from __future__ import annotations

import faulthandler
import gc
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Any

from vigil import extras
from vigil.listen import bind_error, bind_tcp

from .config import Config, ConfigError, load_config


def _bind(config: Config) -> socket.socket:
    from .http.connections import ACCEPT_BACKLOG

    try:
        sock = bind_tcp(config.host, config.port)
    except OSError as exc:
        raise ConfigError(
            bind_error(config.host, config.port, exc, busy="is another server using that port?")
        ) from None
    sock.listen(ACCEPT_BACKLOG)
    sock.set_inheritable(True)
    return sock


class _Terminated(Exception):
    """SIGTERM reached the process outside uvicorn's own handlers."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated


def server_config(app: Any, guard: Any) -> Any:
    """uvicorn's configuration: the guarded h11 protocol, no WebSocket protocol."""
    import uvicorn

    from .http.connections import ACCEPT_BACKLOG
    from .http.protocol import MAX_HEAD_BYTES, protocol_class

    return uvicorn.Config(
        app,
        http=protocol_class(guard),
        # No WebSocket route: an upgrade is answered as any other request (a WebSocket
        # protocol, were websockets or wsproto installed, would take the connection over, out
        # of the guard's sight for good: its place at the cap never given back).
        ws="none",
        h11_max_incomplete_event_size=MAX_HEAD_BYTES,
        backlog=ACCEPT_BACKLOG,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
    )


def serve(config: Config, sock: socket.socket, max_connections: int) -> int:
    import torch
    import transformers
    import uvicorn
    from loguru import logger

    from . import __version__
    from .api.app import build_app
    from .http.connections import ConnectionGuard
    from .service import InferenceService
    from .telemetry.metrics import InferenceMetrics, prepare_multiprocess_dir
    from .telemetry.recorder import RequestRecorder
    from .telemetry.tracing import build_tracer_provider, otlp_endpoint

    metrics = InferenceMetrics(config.model_name, prepare_multiprocess_dir(config.state_dir))
    metrics.build_info(__version__, torch.__version__, transformers.__version__)
    metrics.stall_timeout(config.stall_timeout)
    provider = build_tracer_provider()
    recorder = RequestRecorder(metrics, provider.get_tracer("inference"), config.log_prompts)
    service = InferenceService(config, metrics)
    app = build_app(service, recorder)
    logger.info(
        "listening on http://{}:{} (state dir {}, traces {}, at most {} connections)",
        config.host,
        sock.getsockname()[1],
        config.state_dir,
        otlp_endpoint() or "not exported",
        max_connections,
        model=config.model_name,
    )
    service.start()
    guard = ConnectionGuard(
        max_connections, config.header_timeout, metrics, body_timeout=config.body_timeout
    )
    server = uvicorn.Server(server_config(app, guard))
    # Everything imported so far (torch, transformers: some 400,000 objects) lives as long as
    # the process: out of the collector's sight, a full collection takes microseconds instead
    # of a fifth of a second, during which no thread, the event loop included, would run.
    gc.freeze()
    # uvicorn stops gracefully on SIGTERM, then restores the handler it found and raises the
    # signal again (uvicorn/server.py, capture_signals). With the default handler found, that
    # killed the process before the cleanup below: its identity file stayed in the state
    # directory and the exporter counted every `docker stop`, rollout or stack stop as an
    # unclean exit (InferenceProcessDied). This handler turns the re-raised signal into an
    # exception that runs the cleanup.
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        server.run(sockets=[sock])
    except _Terminated:
        pass
    finally:
        guard.flush()  # the connections closed or refused that the last interval counted
        service.stop()
        if hasattr(provider, "shutdown"):
            provider.shutdown()
        logger.info("stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["doctor"]:
        from .doctor.cli import main as doctor_main

        return doctor_main(argv[1:])
    try:
        config = load_config(argv)
    except ConfigError as exc:
        print(f"python -m inference: error: {exc}", file=sys.stderr)
        return 2
    missing = extras.missing_serve_modules()
    if missing:  # a light install: the doctor runs, the server cannot
        print(
            f"python -m inference: error: serving needs {', '.join(missing)}, which this "
            f"install lacks: {extras.SERVE_INSTALL} adds them",
            file=sys.stderr,
        )
        return 2
    from .http.connections import reserve_descriptors

    # Before the logs start and torch loads: a port or a limit that cannot be had is one line.
    try:
        max_connections = reserve_descriptors(config.max_connections)
        sock = _bind(config)
    except ConfigError as exc:
        print(f"python -m inference: error: {exc}", file=sys.stderr)
        return 2
    from .telemetry.logs import setup_logging

    setup_logging(config.log_level)
    # A crash in native code (a driver or kernel bug) still leaves every thread's Python stack.
    faulthandler.enable(file=sys.stderr, all_threads=True)
    return serve(config, sock, max_connections)


if __name__ == "__main__":
    sys.exit(main())
