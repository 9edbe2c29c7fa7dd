"""The two installs: ``pip install llm-vigil`` (light: the exporter, the doctor's host checks,
the generators) and ``pip install 'llm-vigil[serve]'``, which adds what the inference process
runs on. Whoever needs the serve extra asks here, and says how to get it, instead of failing
on an import."""

from __future__ import annotations

import importlib.util

SERVE_INSTALL = "pip install 'llm-vigil[serve]'"
# The top-level modules that extra brings (and their own dependencies).
SERVE_MODULES = frozenset(
    {
        "torch",
        "transformers",
        "tokenizers",
        "safetensors",
        "huggingface_hub",
        "opentelemetry",
        "starlette",
        "uvicorn",
        "PIL",  # Pillow: the images of vision-language requests
    }
)


def missing_serve_modules() -> list[str]:
    """The serve extra's modules that cannot be imported here (none on a full install)."""
    return sorted(name for name in SERVE_MODULES if not _importable(name))


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a finder that refuses it; a module without a spec
        return False
