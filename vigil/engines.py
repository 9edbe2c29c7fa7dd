"""The serving engines the stack watches, and how to tell them apart from their /metrics.

A target of the exporter may name its engine (``vllm=http://127.0.0.1:8000``); otherwise the
exporter recognises it from the metric names it exposes. Each engine's own names are mapped to
one vocabulary by the recording rules (alerts/engines.py); the sources of the names are cited
there and in the metrics reference.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

# vigil: this project's inference process; vllm, sglang, tgi: the engines people already run.
ENGINES = ("vigil", "vllm", "sglang", "tgi")

# A metric name only that engine exposes, matched at the start of a line of the text format
# (a sample or its # HELP/# TYPE line). vLLM and SGLang prefix every metric with "vllm:" and
# "sglang:", TGI's router with "tgi_" (see alerts/engines.py for the sources); ours publishes
# the engine's heartbeat.
_SIGNATURES = {
    "vllm": re.compile(r"^(# (HELP|TYPE) )?vllm:", re.MULTILINE),
    "sglang": re.compile(r"^(# (HELP|TYPE) )?sglang:", re.MULTILINE),
    "tgi": re.compile(r"^(# (HELP|TYPE) )?tgi_", re.MULTILINE),
    "vigil": re.compile(
        r"^(# (HELP|TYPE) )?inference_progress_heartbeat_timestamp_seconds", re.MULTILINE
    ),
}


def recognise(exposition: str) -> str | None:
    """The engine whose metrics these are, or None when no signature (or several) is found."""
    found = [engine for engine, signature in _SIGNATURES.items() if signature.search(exposition)]
    return found[0] if len(found) == 1 else None


@dataclass(frozen=True)
class Target:
    """A server to watch: its base URL and its engine (None: recognise it from /metrics)."""

    url: str
    engine: str | None = None

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (443 if parts.scheme == "https" else 80)

    def __str__(self) -> str:
        return f"{self.engine}={self.url}" if self.engine else self.url


def parse_target(text: str) -> Target:
    """``[ENGINE=]URL``; ValueError (with a message that says what is wrong) otherwise."""
    engine, sep, url = text.strip().partition("=")
    if not sep or "://" in engine:  # no engine named (a URL may hold '=' in its query)
        engine, url = "", text.strip()
    if engine and engine not in ENGINES:
        raise ValueError(f"must name a known engine ({', '.join(ENGINES)}), not {engine!r}")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host, after ENGINE= if any")
    try:
        _ = parts.port  # raises ValueError for a port outside 0-65535
    except ValueError:
        raise ValueError("must have a port from 0 to 65535") from None
    return Target(url.rstrip("/"), engine or None)
