"""The packages import one way: ``vigil`` is the core, ``exporter`` and ``inference`` build on it
and never on each other, and the exporter needs no torch, transformers or OpenTelemetry (it is
installed next to engines that are not ours, without them)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

# Imported in a fresh interpreter where these cannot be found, as on a light install.
BLOCKED = ("inference", "torch", "transformers", "opentelemetry", "tokenizers", "safetensors",
           "starlette", "uvicorn")

_PROBE = textwrap.dedent("""
    import importlib, importlib.abc, pkgutil, sys

    BLOCKED = {blocked!r}

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{{name}} is blocked: imported by " + sys._getframe(1).f_globals.get("__name__", "?"))
            return None

    sys.meta_path.insert(0, Block())
    package = importlib.import_module({package!r})
    for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        importlib.import_module(module.name)
    leaked = sorted(name for name in sys.modules if name.split(".")[0] in BLOCKED)
    assert not leaked, leaked
    print("imported", {package!r})
""")


@pytest.mark.parametrize("package", ["vigil", "exporter"])
def test_package_imports_without_inference_torch_or_opentelemetry(package):
    result = subprocess.run([sys.executable, "-c", _PROBE.format(blocked=BLOCKED, package=package)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, (f"{package} (or a module it imports) needs one of "
                                    f"{', '.join(BLOCKED)}:\n{result.stderr[-3000:]}")


def test_the_probe_itself_catches_a_forbidden_import():
    """The block works: a package that needs torch is refused (so a pass above means something)."""
    result = subprocess.run([sys.executable, "-c", _PROBE.format(blocked=BLOCKED,
                                                                 package="inference.engine")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "is blocked" in result.stderr


def test_inference_never_imports_the_exporter():
    code = textwrap.dedent("""
        import importlib, pkgutil, sys
        import inference
        for module in pkgutil.walk_packages(inference.__path__, "inference."):
            importlib.import_module(module.name)
        leaked = sorted(n for n in sys.modules if n.split(".")[0] in ("exporter", "tools"))
        assert not leaked, leaked
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
