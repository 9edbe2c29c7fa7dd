"""``python -m notifier`` (console script ``vigil-notifier``): the receiver of Alertmanager's
webhooks. Notifications are printed on stdout, one line each; the JSON log goes to stderr."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .config import ConfigError, load_config


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = load_config(argv)
    except ConfigError as exc:
        print(f"python -m notifier: error: {exc}", file=sys.stderr)
        return 2
    from vigil.logs import setup_logging

    from .app import serve

    setup_logging(config.log_level, stream=sys.stderr)
    try:
        return serve(config)
    except ConfigError as exc:  # the address cannot be had (a busy port, say)
        from loguru import logger

        logger.error("cannot start: {}", exc)
        print(f"python -m notifier: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
