"""What llm-vigil relies on in prometheus_client beyond the metric classes, exercised for real, so
that an upgrade that changes it fails here with a message naming what changed and who depends on
it (rather than as a heartbeat that silently reads as missing, or gauges of dead processes that
stay).

- The multiprocess files: ``inference/telemetry/metrics.py`` (``prepare_multiprocess_dir``)
  swaps ``values.ValueClass`` for ``values.MultiProcessValue()``; ``vigil/statedir.py`` knows
  the file names (``gauge_liveall_<pid>.db``, ``counter_<pid>.db``); ``exporter/inference_dir.py``
  reads the heartbeat with ``MmapedDict.read_all_values_from_file`` ((key, value, timestamp,
  pos), the key JSON ``["<metric>", "<sample>", {labels}, "<help>"]``) and drops a dead
  process's gauges with ``mark_process_dead``; ``exporter/collectors/inference.py`` aggregates
  with ``MultiProcessCollector(None, path=...)``.
- The serving: ``exporter/http.py`` starts ``start_http_server`` (which returns the server and
  its thread), routes requests through ``WSGIServer.set_app`` and serves /metrics with
  ``make_wsgi_app``; the families the exporter yields per scrape are written by
  ``generate_latest``.

A real inference metrics writer runs in a subprocess with ``PROMETHEUS_MULTIPROC_DIR`` set, as
the server does; the reading goes through the exporter's own code.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import json
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import requests
from prometheus_client import CollectorRegistry, generate_latest, make_wsgi_app, start_http_server
from prometheus_client import values as client_values
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.parser import text_string_to_metric_families

from exporter.collectors.inference import InferenceCollector
from exporter.inference_dir import InferenceDirectory
from exporter.registry import build_registry
from vigil import statedir

REPO = Path(__file__).resolve().parents[1]
VERSION = f"prometheus_client {importlib.metadata.version('prometheus_client')}"
HEARTBEAT = 1_700_000_123.25
MODEL = "contract-model"

# The inference server's own metrics writer, in a process of its own, as in production.
_WRITER = textwrap.dedent("""
    import os, sys
    from prometheus_client import values
    from inference.telemetry.metrics import InferenceMetrics, prepare_multiprocess_dir

    metrics = InferenceMetrics(sys.argv[1], prepare_multiprocess_dir(sys.argv[2]))
    assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == str(metrics.metrics_dir)
    assert getattr(values.ValueClass, "_multiprocess", False), values.ValueClass
    metrics.heartbeat.set(float(sys.argv[3]))
    metrics.admission_refused("insufficient_memory")
    print(os.getpid())
""")


def _changed(what: str, depends: str) -> str:
    return f"{VERSION} changed {what}; {depends} depends on it"


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, int]:
    """A state directory with the files of one (finished) inference metrics writer, and its pid."""
    state_dir = tmp_path_factory.mktemp("contract") / "state"
    result = subprocess.run(
        [sys.executable, "-c", _WRITER, MODEL, str(state_dir), repr(HEARTBEAT)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 0, (
        _changed(
            "the multiprocess value class (values.ValueClass / values.MultiProcessValue())",
            "inference/telemetry/metrics.py prepare_multiprocess_dir",
        )
        + ":\n"
        + result.stderr[-3000:]
    )
    return state_dir, int(result.stdout.split()[-1])


def test_multiprocess_file_names(written):
    state_dir, pid = written
    names = sorted(p.name for p in statedir.metrics_dir(state_dir).iterdir())
    assert statedir.live_gauge_file(state_dir, pid).name in names, _changed(
        f"the file of liveall gauges (expected gauge_liveall_{pid}.db, found {names})",
        "vigil/statedir.py live_gauge_file, LIVE_GAUGE_GLOB and the exporter's heartbeat",
    )
    assert f"counter_{pid}.db" in names, _changed(
        f"the file of counters (expected counter_{pid}.db, found {names})",
        "vigil/statedir.py (gauge_files_of keeps counters of a restarted pid)",
    )
    assert [p.name for p in statedir.gauge_files_of(state_dir, pid)] == [
        f"gauge_liveall_{pid}.db"
    ], _changed("the gauge file names <type>_<mode>_<pid>.db", "vigil/statedir.py gauge_files_of")
    for name in names:
        assert statedir.pid_of_file(Path(name)) == pid, _changed(
            f"the pid at the end of the file name ({name})", "vigil/statedir.py pid_of_file"
        )


def test_read_all_values_from_file_yields_key_value_timestamp_pos(written):
    state_dir, pid = written
    depends = "exporter/inference_dir.py InferenceDirectory.heartbeat"
    entries = list(
        MmapedDict.read_all_values_from_file(str(statedir.live_gauge_file(state_dir, pid)))
    )
    assert entries, _changed("MmapedDict.read_all_values_from_file (it read no entry)", depends)
    for entry in entries:
        assert isinstance(entry, tuple) and len(entry) == 4, _changed(
            f"MmapedDict.read_all_values_from_file's entries (expected (key, value, timestamp, "
            f"pos), got {entry!r})",
            depends,
        )
        key, value, timestamp, pos = entry
        assert (
            isinstance(key, str)
            and isinstance(value, float)
            and isinstance(timestamp, float)
            and isinstance(pos, int)
        ), _changed(f"the types of (key, value, timestamp, pos) (got {entry!r})", depends)
        layout = json.loads(key)
        assert (
            isinstance(layout, list)
            and len(layout) == 4
            and isinstance(layout[2], dict)
            and key.startswith(f'["{layout[0]}"')
        ), _changed(
            f'the multiprocess key\'s JSON layout (expected ["<metric>", "<sample>", {{labels}}, '
            f'"<help>"], got {key})',
            depends,
        )
    heartbeat = [e for e in entries if e[0].startswith(f'["{statedir.HEARTBEAT_METRIC}"')]
    assert [e[1] for e in heartbeat] == [HEARTBEAT], _changed(
        f"the key of the heartbeat gauge (no key starts with "
        f'["{statedir.HEARTBEAT_METRIC}" and holds {HEARTBEAT}: {[e[0] for e in entries]})',
        depends,
    )
    assert json.loads(heartbeat[0][0])[2] == {"model": MODEL}


def test_the_exporter_reads_the_heartbeat_and_the_aggregated_values(written):
    state_dir, pid = written
    directory = InferenceDirectory(state_dir)
    assert directory.heartbeat(pid) == HEARTBEAT, _changed(
        "reading a gauge file (InferenceDirectory.heartbeat read nothing)",
        "exporter/inference_dir.py and vigil_process_heartbeat_age_seconds",
    )
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in InferenceCollector(directory).collect()
        for s in f.samples
    }
    depends = "exporter/collectors/inference.py (MultiProcessCollector(None, path=...))"
    assert (
        samples.get((statedir.HEARTBEAT_METRIC, (("model", MODEL), ("pid", str(pid))))) == HEARTBEAT
    ), _changed("liveall gauges' aggregation (one series per pid, label pid)", depends)
    refusals = (
        "inference_admission_refusals_total",
        (("model", MODEL), ("reason", "insufficient_memory")),
    )
    assert samples.get(refusals) == 1.0, _changed(
        "counters' aggregation (summed over processes, sample name <name>_total)", depends
    )


def test_mark_process_dead_removes_the_live_gauges_and_keeps_the_counters(written, tmp_path):
    state_dir, pid = written
    copy = tmp_path / "state"
    shutil.copytree(state_dir, copy)
    mark_process_dead(pid, str(statedir.metrics_dir(copy)))
    names = sorted(p.name for p in statedir.metrics_dir(copy).iterdir())
    assert names == [f"counter_{pid}.db", f"histogram_{pid}.db"], _changed(
        f"mark_process_dead(pid, path) (left {names}; expected the counter and histogram files "
        "only)",
        "exporter/inference_dir.py, which drops a dead process's gauges",
    )


# The signatures used, by parameter name, in order (later parameters may be added).
SIGNATURES = [
    (mark_process_dead, ("pid", "path"), "exporter/inference_dir.py"),
    (
        client_values.MultiProcessValue,
        ("process_identifier",),
        "inference/telemetry/metrics.py prepare_multiprocess_dir",
    ),
    (MmapedDict.read_all_values_from_file, ("filename",), "exporter/inference_dir.py"),
    (
        MultiProcessCollector,
        ("registry", "path"),
        "exporter/collectors/inference.py and inference/telemetry/metrics.py",
    ),
    (start_http_server, ("port", "addr", "registry", "certfile", "keyfile"), "exporter/http.py"),
    (make_wsgi_app, ("registry", "disable_compression"), "exporter/http.py"),
    (generate_latest, ("registry",), "exporter/http.py (through make_wsgi_app)"),
]


@pytest.mark.parametrize(
    "function, expected, depends", SIGNATURES, ids=[s[0].__qualname__ for s in SIGNATURES]
)
def test_signatures(function, expected, depends):
    parameters = tuple(inspect.signature(function).parameters)[: len(expected)]
    assert parameters == expected, _changed(
        f"the signature of {function.__module__}.{function.__qualname__} (parameters "
        f"{parameters}, expected {expected})",
        depends,
    )


def test_registry_takes_collectors_without_names():
    assert "support_collectors_without_names" in inspect.signature(CollectorRegistry).parameters, (
        _changed(
            "CollectorRegistry(support_collectors_without_names=...) (gone, or before 0.25)",
            "exporter/registry.py build_registry (/metrics?name[]= on per-scrape families)",
        )
    )


def test_value_class_is_swappable():
    assert hasattr(client_values, "ValueClass"), _changed(
        "prometheus_client.values.ValueClass (gone)",
        "inference/telemetry/metrics.py prepare_multiprocess_dir",
    )


def test_start_http_server_returns_its_server_whose_app_can_be_replaced():
    registry = CollectorRegistry()
    depends = "exporter/http.py (routing: /metrics, landing page, 404)"
    started = start_http_server(0, "127.0.0.1", registry)
    assert isinstance(started, tuple) and len(started) == 2, _changed(
        f"what start_http_server returns (expected (server, thread), got {started!r})", depends
    )
    server, thread = started
    try:
        assert isinstance(thread, threading.Thread) and thread.daemon

        def teapot(environ, start_response):
            start_response("418 I'm a teapot", [("Content-Type", "text/plain")])
            return [b"routed"]

        server.set_app(teapot)
        response = requests.get(f"http://127.0.0.1:{server.server_port}/x", timeout=10)
        assert (response.status_code, response.text) == (418, "routed"), _changed(
            "the server's use of WSGIServer.set_app (the replaced app was not used)", depends
        )
    finally:
        server.shutdown()
        server.server_close()


def test_generate_latest_writes_the_exporters_families():
    """The families GuardedCollectors yields per scrape: info gets _info, counters _total."""
    from exporter.catalog import family

    class Source:
        def collect(self):
            counter = family("vigil_process_unclean_exits")
            counter.add_metric(["demo"], 2.0)
            yield counter
            info = family("vigil_gpu_driver_info")
            info.add_metric(
                [],
                {"driver_version": "550.54.15", "cuda_version": "12.4", "nvml_version": "12.550"},
            )
            yield info

    text = generate_latest(build_registry([("source", Source())])).decode()
    depends = "exporter/registry.py and exporter/catalog.py"
    for line in (
        "# TYPE vigil_process_unclean_exits_total counter",
        'vigil_process_unclean_exits_total{model="demo"} 2.0',
        "# TYPE vigil_gpu_driver_info gauge",
        'vigil_gpu_driver_info{cuda_version="12.4",driver_version="550.54.15",'
        'nvml_version="12.550"} 1.0',
        "# TYPE vigil_exporter_build_info gauge",
        'vigil_exporter_collector_success{collector="source"} 1.0',
    ):
        assert line in text.splitlines(), _changed(
            f"generate_latest's text (no line {line!r})", depends
        )
    names = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    assert {
        "vigil_process_unclean_exits_total",
        "vigil_gpu_driver_info",
        "vigil_exporter_build_info",
        "process_cpu_seconds_total",
    } <= names
