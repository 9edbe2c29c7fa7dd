"""``python -m inference``: start the instrumented inference server;
``python -m inference doctor``: check the environment it would start in."""

from __future__ import annotations

import faulthandler
import socket
import sys
from collections.abc import Sequence

from vigil import extras

from .config import Config, ConfigError, load_config
from .listen import bind_tcp


def _bind(config: Config) -> socket.socket:
    try:
        sock = bind_tcp(config.host, config.port)
    except OSError as exc:
        raise ConfigError(
            f"cannot listen on {config.host}:{config.port} ({exc.strerror}); is "
            "another server using that port? choose another with --port"
        ) from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(config: Config) -> int:
    import torch
    import transformers
    import uvicorn
    from loguru import logger

    from . import __version__
    from .api.app import build_app
    from .service import InferenceService
    from .telemetry.metrics import InferenceMetrics, prepare_multiprocess_dir
    from .telemetry.recorder import RequestRecorder
    from .telemetry.tracing import build_tracer_provider, otlp_endpoint

    sock = _bind(config)
    metrics = InferenceMetrics(config.model_name, prepare_multiprocess_dir(config.state_dir))
    metrics.build_info(__version__, torch.__version__, transformers.__version__)
    metrics.stall_timeout(config.stall_timeout)
    provider = build_tracer_provider()
    recorder = RequestRecorder(metrics, provider.get_tracer("inference"), config.log_prompts)
    service = InferenceService(config, metrics)
    app = build_app(service, recorder)
    logger.info(
        "listening on http://{}:{} (state dir {}, traces {})",
        config.host,
        sock.getsockname()[1],
        config.state_dir,
        otlp_endpoint() or "not exported",
        model=config.model_name,
    )
    service.start()
    server = uvicorn.Server(
        uvicorn.Config(app, log_config=None, access_log=False, timeout_graceful_shutdown=5)
    )
    try:
        server.run(sockets=[sock])
    finally:
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
    from .telemetry.logs import setup_logging

    setup_logging(config.log_level)
    # A crash in native code (a driver or kernel bug) still leaves every thread's Python stack.
    faulthandler.enable(file=sys.stderr, all_threads=True)
    try:
        return serve(config)
    except ConfigError as exc:
        from loguru import logger

        logger.error("cannot start: {}", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
