"""Default paths both processes agree on without talking to each other."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def default_state_dir() -> str:
    """The state directory the inference process writes and the exporter reads."""
    return str(Path(tempfile.gettempdir()) / "vigil-state")


def default_demo_dir() -> str:
    """Where the embedded demo model is built (the user's cache, as XDG says)."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(cache) / "llm-vigil")
