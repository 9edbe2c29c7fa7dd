"""The packages import one way: ``vigil`` is the core, ``exporter`` and ``inference`` build on it
and never on each other (nor does ``notifier``, Alertmanager's webhook receiver, on either); the
exporter and the notifier need no torch, transformers or OpenTelemetry (they are installed next
to engines that are not ours, without them), and the inference process's API layer never
touches torch (the engine thread does)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from stack_ports import free_ports, port_args

from vigil.extras import SERVE_MODULES

# What a light install (pip install llm-vigil, without the serve extra) lacks.
SERVE_ONLY = ("inference", *sorted(SERVE_MODULES))

# Imports ``package`` and every module under it in a fresh interpreter where ``blocked`` cannot
# be found; each attempt is recorded with the module that made it, even one the importer catches.
_PROBE = textwrap.dedent("""
    import importlib, importlib.abc, pkgutil, sys

    BLOCKED = {blocked!r}
    attempts = []

    def importer():
        frame = sys._getframe(2)
        while frame is not None:
            name = frame.f_globals.get("__name__", "?")
            if not name.startswith(("importlib", "_frozen_importlib")):
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
    assert not attempts, "; ".join(attempts)
    leaked = sorted(name for name in sys.modules if name.split(".")[0] in BLOCKED)
    assert not leaked, leaked
    print("imported", modules)
""")


def _probe(package: str, blocked: tuple[str, ...]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _PROBE.format(blocked=blocked, package=package)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("package", ["vigil", "exporter", "alerts", "dashboards", "notifier"])
def test_light_packages_import_without_inference_torch_or_opentelemetry(package):
    result = _probe(package, SERVE_ONLY)
    assert result.returncode == 0, (
        f"{package} (or a module it imports) needs what only the "
        f"serve extra installs; the importer is named below:\n"
        f"{result.stderr[-3000:]}"
    )


@pytest.mark.parametrize("package", ["inference.api.app", "inference.api"])
def test_the_api_layer_imports_without_torch(package):
    result = _probe(package, ("torch", "transformers"))
    assert result.returncode == 0, (
        f"{package} (or a module it imports) needs torch; the "
        f"importer is named below:\n{result.stderr[-3000:]}"
    )


def test_the_probe_names_the_module_that_imports_a_blocked_one():
    """The block works and names the culprit (so a pass above means something)."""
    result = _probe("inference.engine.engine", ("torch", "transformers"))
    assert result.returncode != 0
    assert "torch imported by inference.engine.engine (blocked)" in result.stderr


def test_inference_never_imports_the_exporter():
    code = textwrap.dedent("""
        import importlib, pkgutil, sys
        import inference
        for module in pkgutil.walk_packages(inference.__path__, "inference."):
            importlib.import_module(module.name)
        leaked = sorted(n for n in sys.modules if n.split(".")[0] in ("exporter", "tools"))
        assert not leaked, leaked
    """)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_the_notifier_imports_only_the_core():
    """The notifier (Alertmanager's webhook receiver) builds on vigil alone: it runs beside
    Alertmanager, with or without the exporter and the inference process."""
    code = textwrap.dedent("""
        import importlib, pkgutil, sys
        import notifier
        for module in pkgutil.walk_packages(notifier.__path__, "notifier."):
            importlib.import_module(module.name)
        leaked = sorted(
            n for n in sys.modules if n.split(".")[0] in ("exporter", "inference", "tools")
        )
        assert not leaked, leaked
    """)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]


# Runs a module as ``python -m`` would, where the serve extra's modules cannot be found.
_LIGHT_RUN = textwrap.dedent("""
    import importlib.abc, runpy, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {blocked!r}:
                raise ImportError(f"{{name}} is not installed (simulated light install)")
            return None

    sys.meta_path.insert(0, Block())
    sys.argv = {argv!r}
    runpy.run_module({module!r}, run_name="__main__", alter_sys=True)
""")


def _light_run(module: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    code = _LIGHT_RUN.format(
        blocked=tuple(sorted(SERVE_MODULES)), argv=[module, *args], module=module
    )
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, check=False
    )


def test_the_server_on_a_light_install_names_the_extra_it_needs(tmp_path):
    result = _light_run("inference", "--model", "demo", "--state-dir", str(tmp_path))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "pip install 'llm-vigil[serve]'" in result.stderr and "torch" in result.stderr


def test_the_stack_on_a_light_install_runs_without_the_inference_process(tmp_path):
    ports = free_ports(("inference", "exporter", "prometheus", "alertmanager", "notifier"))
    result = _light_run(
        "vigil.stack", "--run-dir", str(tmp_path), *port_args(ports), "--stop-after", "3"
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "skipped: inference: needs" in output and "llm-vigil[serve]" in output
    assert "  exporter " in output and "  inference " not in output
