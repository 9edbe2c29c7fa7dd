"""Deprecations fail the run, a release before a removal breaks the server: in the tests' own
process (pytest's filterwarnings in pyproject.toml) and in the servers they start (their
py.warnings log lines, checked when a server stops)."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
from conftest import SERVER_WARNINGS, Server


def test_a_deprecation_in_the_test_process_is_an_error():
    with pytest.raises(DeprecationWarning):
        warnings.warn("old API", DeprecationWarning, stacklevel=1)
    with pytest.raises(FutureWarning):
        warnings.warn("going away", FutureWarning, stacklevel=1)


def test_a_server_that_logged_a_deprecation_fails_when_it_stops(tmp_path):
    log = tmp_path / "server.log"
    # What vigil.logs writes for warnings.warn() (logging.captureWarnings).
    log.write_text(
        '{"level": "WARNING", "message": "x.py:1: FutureWarning: `past_key_values` is '
        'deprecated", "logger": "py.warnings"}\n'
    )
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    with pytest.raises(AssertionError, match="past_key_values"):
        Server(process, log, tmp_path).stop()
    log.write_text('{"level": "INFO", "message": "request finished", "logger": "x"}\n')
    assert Server(process, log, tmp_path).stop() == 0


def test_servers_log_deprecations_instead_of_hiding_them(tmp_path):
    """Python hides DeprecationWarning outside __main__ by default: the servers' environment
    turns it on, and the one known third-party warning stays ignored."""
    code = (
        "import warnings, logging, sys\n"
        "logging.basicConfig(stream=sys.stdout, format='%(name)s %(message)s')\n"
        "logging.captureWarnings(True)\n"
        "warnings.warn('old API', DeprecationWarning, stacklevel=1)\n"
        'warnings.warn("__array__ implementation doesn\'t accept a copy keyword, so ...", '
        "DeprecationWarning, stacklevel=1)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"PYTHONWARNINGS": SERVER_WARNINGS, "PATH": "/usr/bin:/bin"},
        check=True,
    )
    assert "py.warnings" in result.stdout and "old API" in result.stdout
    assert "__array__" not in result.stdout
