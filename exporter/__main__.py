"""``python -m exporter``: the companion exporter."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .config import ConfigError, load_config


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = load_config(argv)
    except ConfigError as exc:
        print(f"python -m exporter: error: {exc}", file=sys.stderr)
        return 2
    from vigil.logs import setup_logging

    from .app import serve

    setup_logging(config.log_level)
    try:
        return serve(config)
    except ConfigError as exc:  # the address cannot be had (a busy port, say)
        from loguru import logger

        logger.error("cannot start: {}", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
