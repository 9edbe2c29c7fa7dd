"""The API layer never imports torch: ``inference.api`` (the Starlette app, schemas, prompts,
responses) and what it imports load in an interpreter where torch and transformers cannot be
found. The engine, which needs torch, reaches the API only through the objects handed to it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCKED = ("torch", "transformers")

_PROBE = textwrap.dedent("""
    import importlib, importlib.abc, pkgutil, sys

    BLOCKED = {blocked!r}
    attempts = []

    def importer():
        frame = sys._getframe(2)
        while frame is not None:
            name = frame.f_globals.get("__name__", "?")
            if not (name.startswith("importlib") or name.startswith("_frozen_importlib")):
                return name
            frame = frame.f_back
        return "?"

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                attempts.append(f"{{name}} imported by {{importer()}}")
                raise ImportError(f"{{attempts[-1]}} (blocked)")
            return None

    sys.meta_path.insert(0, Block())
    package = importlib.import_module({package!r})
    modules = [package.__name__]
    if hasattr(package, "__path__"):
        modules += [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
    for module in modules:
        importlib.import_module(module)
    # An import attempt caught and swallowed by the importer counts too.
    assert not attempts, "; ".join(attempts)
    leaked = sorted(name for name in sys.modules if name.split(".")[0] in BLOCKED)
    assert not leaked, leaked
    print("imported", modules)
""")


def _probe(package: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _PROBE.format(blocked=BLOCKED, package=package)],
                          capture_output=True, text=True, timeout=120, check=False)


def test_the_api_layer_imports_without_torch():
    for package in ("inference.api.app", "inference.api"):
        result = _probe(package)
        assert result.returncode == 0, (
            f"{package} (or a module it imports) needs {' or '.join(BLOCKED)}; the importing "
            f"module is named below:\n{result.stderr[-3000:]}")


def test_the_probe_names_the_module_that_imports_torch():
    """The block works and names the culprit (so a pass above means something)."""
    result = _probe("inference.engine.engine")
    assert result.returncode != 0
    assert "torch imported by inference.engine.engine (blocked)" in result.stderr
