"""The exporter's pieces on literal inputs: unit conversions, configuration, labels, /proc."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from exporter.catalog import CLOCK_EVENT_REASONS
from exporter.config import ConfigError, ExporterConfig, load_config
from exporter.probe import target_label
from exporter.procview import ProcessLocator
from vigil.engines import Target, parse_target
from vigil.gpu import units
from vigil.procfs import innermost_pid, read_stat
from vigil.statedir import Identity


def test_unit_conversions():
    assert units.milliwatts_to_watts(612500) == 612.5
    assert units.millijoules_to_joules(1500) == 1.5
    assert units.megahertz_to_hertz(1980) == 1.98e9
    assert units.percent_to_ratio(97) == 0.97
    assert units.cuda_version_string(12040) == "12.4"
    assert units.cuda_version_string(13000) == "13.0"
    assert units.cuda_version_string(11080) == "11.8"
    assert units.text(b"NVIDIA H100") == "NVIDIA H100"
    assert units.text("550.54.15") == "550.54.15"


def test_clock_event_reasons_from_mask():
    reasons = units.reasons_from_mask(0x44, CLOCK_EVENT_REASONS)
    assert reasons["sw_power_cap"] == 1 and reasons["hw_thermal_slowdown"] == 1
    assert sum(reasons.values()) == 2
    assert set(reasons) == set(CLOCK_EVENT_REASONS.values())
    assert sum(units.reasons_from_mask(0, CLOCK_EVENT_REASONS).values()) == 0


def test_config_flags_environment_and_defaults():
    config = load_config(
        ["--port", "9500", "--target", "http://a:8000/", "--target", "http://b:8000"], environ={}
    )
    assert config.port == 9500 and config.host == "127.0.0.1"
    assert config.target == ("http://a:8000", "http://b:8000")
    config = load_config(
        [],
        environ={
            "VIGIL_EXPORTER_TARGET": "http://a:1, http://b:2",
            "VIGIL_EXPORTER_STATE_DIR": "/srv/state",
        },
    )
    assert config.target == ("http://a:1", "http://b:2") and config.state_dir == "/srv/state"
    # the flag wins over the variable
    config = load_config(
        ["--target", "http://c:3"], environ={"VIGIL_EXPORTER_TARGET": "http://a:1"}
    )
    assert config.target == ("http://c:3",)
    assert load_config([], environ={}) == ExporterConfig()
    # a target may name its engine
    config = load_config(
        [], environ={"VIGIL_EXPORTER_TARGET": "vllm=http://a:8000/,http://b:1/x?k=v=w"}
    )
    assert config.target == ("vllm=http://a:8000", "http://b:1/x?k=v=w")
    assert [parse_target(t) for t in config.target] == [
        Target("http://a:8000", "vllm"),
        Target("http://b:1/x?k=v=w", None),
    ]
    assert parse_target("sglang=https://gpu-node").port == 443


@pytest.mark.parametrize(
    "argv,environ,message",
    [
        (
            ["--target", "localhost:8000"],
            {},
            "--target: 'localhost:8000' is not valid (must be an http",
        ),
        (["--port", "70000"], {}, "--port"),
        (
            ["--target", "ollama=http://a:11434"],
            {},
            "--target: 'ollama=http://a:11434' is not valid (must name a known engine "
            "(vigil, vllm, sglang, tgi), not 'ollama')",
        ),
        (["--target", "vllm=a:8000"], {}, "must be an http:// or https:// URL with a host"),
        ([], {"VIGIL_EXPORTER_PROBE_INTERVAL": "0"}, "VIGIL_EXPORTER_PROBE_INTERVAL"),
        (
            [],
            {"VIGIL_EXPORTER_TARGETS": "http://a"},
            "unknown environment variable(s) VIGIL_EXPORTER_TARGETS",
        ),
        (["--gpu-backend", "fake"], {}, "--gpu-backend fake needs --fake-gpu-fleet"),
        (
            ["--hang-dump-after", "0"],
            {},
            "--hang-dump-after: '0' is not valid (must be a positive number of seconds)",
        ),
        ([], {"VIGIL_EXPORTER_HANG_DUMP_INTERVAL": "soon"}, "VIGIL_EXPORTER_HANG_DUMP_INTERVAL"),
        ([], {"VIGIL_EXPORTER_HANG_DUMPS": "maybe"}, "(must be true or false)"),
        (["--py-spy", " "], {}, "--py-spy: ' ' is not valid (must name an executable"),
    ],
)
def test_config_errors_name_the_option(argv, environ, message):
    with pytest.raises(ConfigError) as error:
        load_config(argv, environ=environ)
    assert message in str(error.value)


def test_hang_dump_options():
    config = load_config([], environ={})
    assert not config.hang_dumps and config.py_spy == "py-spy"
    assert (config.hang_dump_after, config.hang_dump_interval) == (120.0, 600.0)
    config = load_config(
        ["--hang-dumps", "--hang-dump-after", "30", "--py-spy", "/opt/py-spy/bin/py-spy"],
        environ={"VIGIL_EXPORTER_HANG_DUMP_INTERVAL": "900"},
    )
    assert config.hang_dumps and config.hang_dump_after == 30.0
    assert config.hang_dump_interval == 900.0 and config.py_spy == "/opt/py-spy/bin/py-spy"
    assert load_config([], environ={"VIGIL_EXPORTER_HANG_DUMPS": "true"}).hang_dumps


def test_target_label_drops_credentials_query_and_slash():
    assert target_label("http://user:secret@10.0.0.5:8000/?key=x") == "http://10.0.0.5:8000"
    assert target_label("https://api.example.com/v1/") == "https://api.example.com/v1"
    assert target_label("http://[::1]:8000") == "http://[::1]:8000"


def test_read_stat_of_this_process():
    stat = read_stat(os.getpid())
    assert stat is not None and stat.pid == os.getpid()
    assert stat.state in ("running", "sleeping") and stat.threads >= 1
    assert stat.resident_bytes > 10 * 1024 * 1024 and stat.cpu_seconds > 0
    assert innermost_pid(os.getpid()) == os.getpid()
    assert read_stat(2**22 + 12345) is None


def test_read_stat_with_a_command_name_holding_spaces_and_parentheses(tmp_path: Path):
    proc = tmp_path / "proc"
    (proc / "77").mkdir(parents=True)
    fields = [
        "S",
        "1",
        "77",
        "77",
        "0",
        "-1",
        "4194560",
        "0",
        "0",
        "0",
        "0",
        "250",
        "50",
        "0",
        "0",
        "20",
        "0",
        "9",
        "0",
        "123456",
        "1000",
        "300",
    ] + ["0"] * 30
    (proc / "77" / "stat").write_text("77 (python (worker) x) " + " ".join(fields) + "\n")
    stat = read_stat(77, proc)
    assert stat.state == "sleeping" and stat.threads == 9 and stat.start_ticks == 123456
    assert stat.cpu_seconds == pytest.approx(300 / os.sysconf("SC_CLK_TCK"))
    assert stat.resident_bytes == 300 * os.sysconf("SC_PAGE_SIZE")


def test_locator_finds_a_containerised_process_by_its_namespace_pid(tmp_path: Path):
    """The inference process calls itself pid 1 (in its container); we see it as 4242."""
    proc = tmp_path / "proc"
    for pid, ns_pids, start in ((4242, "4242 1", 5555), (4243, "4243 2", 5556), (1, "1", 10)):
        (proc / str(pid)).mkdir(parents=True)
        fields = (
            ["S", "0"]
            + ["0"] * 9
            + ["100", "20"]
            + ["0"] * 4
            + ["4", "0", str(start), "0", "50"]
            + ["0"] * 30
        )
        (proc / str(pid) / "stat").write_text(f"{pid} (python) " + " ".join(fields))
        (proc / str(pid) / "status").write_text(f"Name:\tpython\nNSpid:\t{ns_pids}\n")
    locator = ProcessLocator(proc)
    identity = Identity(pid=1, start_ticks=5555, model="glm", path=tmp_path / "1.json", fields={})
    stat = locator.locate(identity)
    assert stat is not None and stat.pid == 4242
    assert locator.locate(identity).pid == 4242  # from the cache
    gone = Identity(pid=1, start_ticks=9999, model="glm", path=tmp_path / "1.json", fields={})
    assert locator.locate(gone) is None
